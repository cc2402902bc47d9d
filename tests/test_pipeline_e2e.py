"""End to end: a real `dvc repro` of the whole pipeline in a temporary copy of the repository.

Tiny params override (tests/project.py), real git, DVC, MLflow (SQLite store) and lm-eval.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.project import make_project, read_params, run, set_params

pytestmark = pytest.mark.slow

STAGES = ["corpus", "model", "calibration", "activations", "search", "export", "skip_calibration", "benchmark"]
UPSTREAM = {
    "model": ["corpus"],
    "calibration": ["corpus", "model"],
    "activations": ["model", "calibration"],
    "search": ["model", "calibration", "activations"],
    "export": ["model", "search", "activations"],
    "skip_calibration": ["model", "export", "calibration"],
    "benchmark": ["model", "export", "skip_calibration", "search", "corpus"],
}
DIRS = {"skip_calibration": "skip"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    proj = make_project(tmp_path_factory.mktemp("e2e") / "proj")
    run(proj, "dvc", "repro")
    run(proj, "git", "add", "-A")
    run(proj, "git", "commit", "-qm", "repro")  # dvc.lock, as a user would commit it
    return proj


def _runs(project: Path) -> list:
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(read_params(project)["tracking"]["experiment"])
    return client.search_runs([exp.experiment_id], max_results=500)


def test_every_stage_ran_and_pipeline_is_up_to_date(project):
    status = run(project, "dvc", "status").stdout
    assert "up to date" in status, status
    for stage in STAGES:
        record = json.loads((project / "outputs" / DIRS.get(stage, stage) / "run.json").read_text())
        assert record["stage"] == stage and record["run_id"]


def test_one_mlflow_run_per_stage_with_lineage(project):
    runs = [r for r in _runs(project) if "mlflow.parentRunId" not in r.data.tags]
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert sorted(by_stage) == sorted(STAGES)
    assert len(runs) == len(STAGES)
    commit = run(project, "git", "rev-parse", "HEAD~1").stdout.strip()  # the commit the stages ran on
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    for stage, r in by_stage.items():
        tags = r.data.tags
        assert r.info.status == "FINISHED"
        assert tags["git.commit"] == commit
        assert tags["git.dirty"] == "False"
        # DVC hashes of outs as dvc.lock recorded them
        for out in lock[stage]["outs"]:
            assert tags[f"dvc.out.{out['path']}"] == out["md5"], (stage, out["path"])
        # deps hashes: upstream outputs as dvc.lock recorded them
        for dep in lock[stage]["deps"]:
            if dep["path"].startswith("outputs/"):
                assert tags[f"dvc.dep.{dep['path']}"] == dep["md5"], (stage, dep["path"])
        for up in UPSTREAM.get(stage, []):
            assert tags[f"upstream.{up}.run_id"] == by_stage[up].info.run_id, (stage, up)


def test_benchmark_has_four_variant_child_runs_with_upstream_settings(project):
    runs = _runs(project)
    parent = next(r for r in runs if r.data.tags.get("stage") == "benchmark" and "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["variant"] for r in children) == ["original", "original_skip", "pruned", "pruned_skip"]
    r_param = str(read_params(project)["search"]["r"])
    for child in children:
        assert "average_accuracy" in child.data.metrics
        if child.data.tags["variant"].startswith("pruned"):  # the settings that produced the pruned model
            assert child.data.params["search.r"] == r_param
        else:
            assert "search.r" not in child.data.params
    report = (project / "outputs" / "benchmark" / "report.md").read_text()
    for variant in ("original", "original_skip", "pruned", "pruned_skip"):
        assert f"| {variant} |" in report


def test_exported_checkpoint_loads_with_plain_transformers(project):
    from transformers import AutoModelForCausalLM

    r = read_params(project)["search"]["r"]
    model = AutoModelForCausalLM.from_pretrained(project / "outputs" / "export" / "model")
    assert model.config.num_local_experts == r
    selection = json.loads((project / "outputs" / "search" / "selection.json").read_text())
    assert model.config.kept_experts == {str(layer["layer"]): layer["kept"] for layer in selection["layers"]}
    skip = AutoModelForCausalLM.from_pretrained(project / "outputs" / "skip" / "model")
    assert set(skip.config.expert_skip_thresholds) == set(model.config.kept_experts)


def test_second_repro_is_a_fast_noop(project):
    began = time.time()
    out = run(project, "dvc", "repro").stdout
    assert "Data and pipelines are up to date" in out
    assert time.time() - began < 60


def test_skip_quantile_change_reruns_only_skip_and_benchmark(project):
    params = read_params(project)
    params["skip"]["quantile"] = 0.3
    set_params(project, params)
    try:
        status = json.loads(run(project, "dvc", "status", "--json").stdout)
        assert sorted(status) == ["skip_calibration"], status  # the only stage whose own deps changed
        dry = run(project, "dvc", "repro", "--dry").stdout
        assert _ran(dry)[0] == "skip_calibration" and "corpus" not in _ran(dry), dry
        out = run(project, "dvc", "repro").stdout
        assert _ran(out) == ["skip_calibration", "benchmark"], out
    finally:
        # back to the committed params, dvc.lock and git-tracked outputs (run.json, metrics.json), then
        # DVC-cached outputs from the cache. From HEAD, not the index: core.autostage staged dvc.lock.
        run(project, "git", "reset", "-q", "--hard", "HEAD")
        run(project, "dvc", "checkout", "--force")
    assert "up to date" in run(project, "dvc", "status").stdout


def _ran(log: str) -> list[str]:
    return [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")]
