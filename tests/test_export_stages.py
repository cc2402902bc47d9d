"""The export and skip_calibration stage scripts, run as DVC runs them, on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.calibration import load_calibration_set
from pipeline.export import Selection, export_pruned
from pipeline.io import save_tensors, sha256_file, write_json
from pipeline.models import get_adapter
from pipeline.models.loading import build_manifest, load_model
from tests.factory import save_tiny_checkpoint
from tests.project import read_params, run_stage, set_params, stage_dir_project, write_calibration_set, write_run_records
from tests.test_export import cached_inputs, selection_dict

pytestmark = pytest.mark.slow


def _project(tmp_path: Path) -> Path:
    """A bare stage folder with the upstream outputs the two stages read (their run.json included)."""
    project = stage_dir_project(tmp_path, {
        "tracking": {"experiment": "test-export"},
        "runtime": {"device": "cpu"},
        "export": {"max_shard_size": "100KB"},
        "skip": {"batch_size": 4},
        "recover": {"steps": 3, "batch_size": 4, "checkpoint_every": 2},
    })
    out = project / "outputs"
    checkpoint = save_tiny_checkpoint(out / "model" / "checkpoint")
    manifest = build_manifest("embedded", checkpoint, None)
    manifest.save(out / "model" / "manifest.json")
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    write_calibration_set(project, "general", ids)
    write_run_records(project, "model", "search", "activations")
    return project


def test_skip_calibration_stage(tmp_path: Path) -> None:
    project = _project(tmp_path)
    out = project / "outputs"
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    model = load_model(out / "model" / "checkpoint")
    adapter = get_adapter(model.config)
    selection = Selection.from_dict(selection_dict(model, r=6, model_fingerprint=manifest["fingerprint"]))
    fingerprint = manifest["fingerprint"]
    ids = load_calibration_set(out / "calibration" / "general", "general").input_ids
    export_pruned(model, adapter, selection, out / "export" / "model", source_fingerprint=fingerprint, progress=False,
                  inputs=cached_inputs(load_model(out / "model" / "checkpoint"), ids).__getitem__, merge="output",
                  merged_dir=out / "export" / "merged")
    write_run_records(project, "export")

    result = run_stage(project, "recover")  # router-only distillation (recover.steps: 3 in _project)
    assert result.returncode == 0, result.stderr[-3000:]
    recovered = json.loads((out / "recover" / "model" / "config.json").read_text())
    assert recovered["recovery"]["steps"] == 3 and recovered["recovery"]["targets"] == "router"
    assert recovered["kept_experts"] == {str(k): v for k, v in selection.kept.items()}
    assert not list((out / ".work" / "recover").glob("*/state.safetensors"))  # the resumable state is gone
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run_id = json.loads((out / "recover" / "run.json").read_text())["run_id"]
    curve = client.get_metric_history(run_id, "train/kl")
    assert [m.step for m in curve] == [0, 1, 2] and all(m.value > 0 for m in curve)
    assert len(client.get_metric_history(run_id, "train/lm")) == 3
    tags = client.get_run(run_id).data.tags
    assert {"dvc.dep.outputs/export/model", "dvc.dep.outputs/model/checkpoint"} <= set(tags)

    result = run_stage(project, "skip_calibration")
    assert result.returncode == 0, result.stderr[-3000:]
    thresholds = json.loads((out / "skip" / "thresholds.json").read_text())
    assert set(thresholds["pruned"]) == set(thresholds["original"]) == set(thresholds["merged"]) == {"0", "1"}
    assert set(thresholds["recovered"]) == {"0", "1"}  # measured on the recovered model itself
    assert thresholds["quantile"] == 0.5 and thresholds["calibration"] == "general"
    for variant in ("pruned", "original", "merged"):
        assert abs(thresholds["skipped_fraction"][variant]["layers"]["0"] - 0.5) <= 1 / 256
        assert abs(thresholds["skipped_fraction"][variant]["second_expert"] - 0.5) <= 0.05
    config = json.loads((out / "skip" / "model" / "config.json").read_text())
    assert config["expert_skip_thresholds"] == thresholds["pruned"]
    assert config["kept_experts"] == {str(k): v for k, v in selection.kept.items()}
    metrics = json.loads((out / "skip" / "metrics.json").read_text())
    assert metrics["beta/pruned/layer_0"] == thresholds["pruned"]["0"]
    assert (out / "skip" / "run.json").is_file()

    # a calibration set whose stage never ran: one line naming the stage to run, previous outputs untouched
    params = read_params(project)
    params["calibration"]["sets"]["other"] = params["calibration"]["sets"]["general"]
    params["skip"]["calibration"] = "other"
    set_params(project, params)
    before = sha256_file(out / "skip" / "thresholds.json")
    result = run_stage(project, "skip_calibration")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: skip_calibration: outputs/calibration/other/run.json does not exist: "
        "run the 'calibration@other' stage first (dvc repro calibration@other)"
    )
    assert sha256_file(out / "skip" / "thresholds.json") == before
    # ... and one whose stage ran but whose tokens are gone: one line naming the key
    (out / "calibration" / "other").mkdir()
    (out / "calibration" / "other" / "run.json").write_text('{"stage": "calibration@other", "run_id": null}\n')
    result = run_stage(project, "skip_calibration")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: skip_calibration: skip.calibration: calibration set 'other' is not built "
        "(outputs/calibration/other/input_ids.safetensors is missing); "
        "check calibration.sets.other and run dvc repro calibration@other"
    )
    assert sha256_file(out / "skip" / "thresholds.json") == before


def test_export_stage(tmp_path: Path) -> None:
    project = _project(tmp_path)
    out = project / "outputs"
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    model = load_model(out / "model" / "checkpoint")
    calib = load_calibration_set(out / "calibration" / "general", "general")
    ids = calib.input_ids
    xs = cached_inputs(model, ids)
    files = {}
    for i, x in xs.items():
        path = out / "activations" / "layers" / f"layer_{i:03d}.safetensors"
        save_tensors(path, {"x": x})
        files[str(i)] = {"file": f"layers/{path.name}", "sha256": sha256_file(path)}
    write_json(
        out / "activations" / "manifest.json",
        {"model_fingerprint": manifest["fingerprint"], "calibration": "general", "calibration_fingerprint": calib.fingerprint,
         "dtype": "float32", "num_samples": 8, "seq_len": 32, "hidden_size": 32, "moe_layers": [0, 1], "files": files},
    )
    data = selection_dict(model, r=6, model_fingerprint=manifest["fingerprint"])
    write_json(out / "search" / "selection.json", data)

    result = run_stage(project, "export")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "export" / "metrics.json").read_text())
    assert metrics["params_after"] < metrics["params_before"]
    assert metrics["equivalence_max_rel_error"] < 1e-5
    assert len(list((out / "export" / "model").glob("*.safetensors"))) > 1
    assert json.loads((out / "export" / "model" / "config.json").read_text())["num_local_experts"] == 6
    assert not (out / "export" / "merged" / "config.json").exists()  # export.merge none: a README only
    assert "export.merge" in (out / "export" / "merged" / "README.md").read_text()

    # merging on, top-2 -> top-1: both checkpoints, the per-layer losses in the metrics
    params = read_params(project)
    params["export"].update(merge="router", top_k=1)
    set_params(project, params)
    result = run_stage(project, "export")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "export" / "metrics.json").read_text())
    for layer in (0, 1):
        assert metrics[f"reconstruction_loss/layer_{layer}/merged"] > 0
        assert metrics[f"reconstruction_loss/layer_{layer}/pruned"] > 0
    merged = json.loads((out / "export" / "merged" / "config.json").read_text())
    assert set(merged["merged_experts"]) == {"0", "1"} and merged["merging"]["method"] == "router"
    assert merged["num_experts_per_tok"] == 1 and merged["num_local_experts"] == 6
    params["export"].update(merge="none", top_k=None)
    set_params(project, params)

    data["model_fingerprint"] = "0000000000000000"
    write_json(out / "search" / "selection.json", data)
    result = run_stage(project, "export")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "made for model 0000000000000000" in result.stderr.strip().splitlines()[-1]
