"""Team use (docs/team.md): a DVC remote shared between two clones, and a shared MLflow server.

(a) Clone A ran the pipeline; it adds a local-directory DVC remote, commits the config and pushes.
    Clone B is a plain `git clone` of A: `dvc pull` brings every output (checkpoints included)
    back byte for byte and `dvc status` is clean, without running a stage.
(b) `mlflow server` with a SQLite backend and a proxied artifact store (`--artifacts-destination`)
    on 127.0.0.1; B reruns a stage with MLFLOW_TRACKING_URI pointing at it; the run, its params,
    metrics and artifacts are read back through the server.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.project import mlflow_server, run

pytestmark = pytest.mark.slow


def tree_digest(path: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``path`` (or of ``path`` itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p.relative_to(path).as_posix() if p != path else "": hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def lock_outs(project: Path) -> list[str]:
    """Every output path recorded in dvc.lock."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]


@pytest.fixture(scope="module")
def pulled_clone(compared_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Clone B of ``compared_project`` (A) with A's outputs pulled from a local-directory remote."""
    base = tmp_path_factory.mktemp("team")
    remote = base / "dvc-remote"
    a = compared_project
    run(a, "dvc", "remote", "add", "--default", "--force", "shared", str(remote))
    run(a, "git", "add", ".dvc/config")
    run(a, "git", "commit", "-qm", "DVC remote for the team")
    pushed = run(a, "dvc", "push")
    assert remote.is_dir() and any(remote.rglob("*")), pushed.stdout
    b = base / "clone-b"
    run(base, "git", "clone", "-q", str(a), str(b))
    assert not (b / "outputs" / "model" / "checkpoint").exists()  # outputs come from the remote, not git
    run(b, "dvc", "pull")
    return b


def test_dvc_pull_restores_every_output(compared_project: Path, pulled_clone: Path) -> None:
    a, b = compared_project, pulled_clone
    outs = lock_outs(a)
    sets = [f"outputs/calibration/{name}/{file}" for name in ("general", "arith") for file in ("input_ids.safetensors", "manifest.json")]
    for must in ("outputs/model/checkpoint", "outputs/search/selection.json", "outputs/export/model",
                 "outputs/activations/layers", "outputs/skip/model", *sets):
        assert must in outs
    for out in outs:
        assert (b / out).exists(), f"{out} missing in the clone after dvc pull"
        assert tree_digest(b / out) == tree_digest(a / out), f"{out} differs between the clones"
    status = run(b, "dvc", "status")
    assert "up to date" in status.stdout, status.stdout
    dry = run(b, "dvc", "repro", "--dry")
    assert "Running stage" not in dry.stdout, dry.stdout


def test_shared_mlflow_server_records_a_teammates_run(pulled_clone: Path, tmp_path: Path) -> None:
    b = pulled_clone
    artifacts = tmp_path / "server-artifacts"
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    with mlflow_server(store, "--artifacts-destination", str(artifacts), cwd=tmp_path, log=tmp_path / "server.log") as url:
        run(b, "dvc", "repro", "--force", "--single-item", "search", MLFLOW_TRACKING_URI=url)
        client = MlflowClient(url)
        exp = client.get_experiment_by_name("moe-expert-pruning")
        assert exp is not None
        # The experiment uses the server's proxied store, not a path on the teammate's machine.
        assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
        runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'search'")
        assert len(runs) == 1
        found = runs[0]
        assert found.info.status == "FINISHED"
        assert found.data.params["search.r"] == "4"
        assert found.data.metrics["loss"] > 0
        assert found.data.tags["git.commit"]
        assert found.data.tags["upstream.activations.run_id"]
        assert found.data.tags["upstream.calibration/general.run_id"]  # the search's own set, from dvc.yaml deps
        listed = {a.path for a in client.list_artifacts(found.info.run_id)}
        assert "selection.json" in listed
        plots = {a.path for a in client.list_artifacts(found.info.run_id, "plots")}
        assert "plots/loss_distribution.png" in plots
        local = Path(client.download_artifacts(found.info.run_id, "selection.json", str(tmp_path / "dl")))
        assert local.read_bytes() == (b / "outputs" / "search" / "selection.json").read_bytes()
        record = (b / "outputs" / "search" / "run.json").read_text()
        assert found.info.run_id in record and url in record
    # The artifacts went through the server into its destination, nothing into the clone.
    assert list(artifacts.rglob("selection.json"))
    assert not (b / "mlartifacts").exists() and not (b / "mlflow.db").exists()
