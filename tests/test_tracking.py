"""MLflow tracking against a real SQLite store: runs, lineage tags, FAILED on exceptions."""

from __future__ import annotations

import socket

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError
from pipeline.tracking import StageRun


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"  # one store: migrations take seconds
    yield uri
    mlflow.set_tracking_uri(None)


def _run(store, tmp_path, **kw):
    return StageRun("search", "exp", store, artifact_root=tmp_path / "art", **kw)


def test_finished_run_has_params_metrics_tags(store, tmp_path):
    with _run(store, tmp_path, params={"search.r": 6, "search.strategy": "auto"}, tags={"git.commit": "abc"}) as run:
        run.log_metrics({"loss/layer_0": 1.5, "bad": float("nan")})
        run.log_reference("checkpoint", "outputs/export/model", "d41d8cd98f00b204e9800998ecf8427e.dir")
        (tmp_path / "small.json").write_text("{}")
        run.log_artifact(tmp_path / "small.json")
    info = MlflowClient(store).get_run(run.run_id)
    assert info.info.status == "FINISHED"
    assert info.data.params == {"search.r": "6", "search.strategy": "auto"}
    assert info.data.metrics == {"loss/layer_0": 1.5}
    assert info.data.tags["stage"] == "search"
    assert info.data.tags["git.commit"] == "abc"
    assert info.data.tags["artifact.checkpoint.path"] == "outputs/export/model"
    assert [a.path for a in MlflowClient(store).list_artifacts(run.run_id)] == ["small.json"]


def test_exception_marks_run_failed(store, tmp_path):
    with pytest.raises(ValueError), _run(store, tmp_path) as run:
        raise ValueError("boom")
    info = MlflowClient(store).get_run(run.run_id)
    assert info.info.status == "FAILED"
    assert "boom" in info.data.tags["error"]


def test_child_runs_are_nested(store, tmp_path):
    with _run(store, tmp_path) as run:
        with run.child("pruned", params={"r": 6}) as child:
            child.log_metrics({"acc": 0.5})
    client = MlflowClient(store)
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == run.run_id
    assert client.get_run(child.run_id).data.metrics == {"acc": 0.5}


def test_disabled_tracking_is_a_noop(store, tmp_path):
    with _run(store, tmp_path, enabled=False) as run:
        run.log_metrics({"a": 1.0})
    assert run.run_id is None


def test_unreachable_server_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PipelineError, match=r"MLflow tracking server http://127\.0\.0\.1:\d+ is unreachable"):
        with StageRun("corpus", "exp", f"http://127.0.0.1:{port}"):
            pass


@pytest.mark.parametrize(
    ("uri", "local"),
    [("sqlite:///x/mlflow.db", True), ("file:///x/mlruns", True), ("postgresql://db/mlflow", True),
     ("http://127.0.0.1:5000", False), ("https://mlflow.example.com", False), ("databricks", False)],
)
def test_artifact_root_is_local_only_beside_a_local_store(uri, local, tmp_path):
    from pipeline.tracking import default_artifact_root

    root = default_artifact_root(uri, tmp_path)
    assert root == (tmp_path.resolve() / "mlartifacts" if local else None)
