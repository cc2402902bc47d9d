"""The export and skip_calibration stage scripts, run as DVC runs them, on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.export import Selection, export_pruned
from pipeline.io import load_tensors, save_tensors, sha256_file, write_json
from pipeline.models import get_adapter
from pipeline.models.loading import build_manifest, load_model
from tests.factory import save_tiny_checkpoint
from tests.test_export import cached_inputs, selection_dict

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _project(tmp_path: Path) -> Path:
    """A project directory with the upstream outputs the two stages read."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["experiment"] = "test-export"
    params["runtime"]["device"] = "cpu"
    params["export"]["max_shard_size"] = "100KB"
    params["skip"]["batch_size"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "outputs"
    checkpoint = save_tiny_checkpoint(out / "model" / "checkpoint")
    manifest = build_manifest("embedded", checkpoint, None)
    manifest.save(out / "model" / "manifest.json")
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    save_tensors(out / "calibration" / "general.safetensors", {"input_ids": ids})
    for stage in ("model", "calibration", "search", "activations"):
        write_json(out / stage / "run.json", {"stage": stage, "run_id": None})
    return tmp_path


def _run(project: Path, stage: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"], cwd=project, env=env, capture_output=True, text=True, timeout=600
    )


def test_skip_calibration_stage(tmp_path: Path) -> None:
    project = _project(tmp_path)
    out = project / "outputs"
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    model = load_model(out / "model" / "checkpoint")
    adapter = get_adapter(model.config)
    selection = Selection.from_dict(selection_dict(model, r=6, model_fingerprint=manifest["fingerprint"]))
    fingerprint = manifest["fingerprint"]
    export_pruned(model, adapter, selection, out / "export" / "model", source_fingerprint=fingerprint, progress=False)
    write_json(out / "export" / "run.json", {"stage": "export", "run_id": None})

    result = _run(project, "skip_calibration")
    assert result.returncode == 0, result.stderr[-3000:]
    thresholds = json.loads((out / "skip" / "thresholds.json").read_text())
    assert set(thresholds["pruned"]) == set(thresholds["original"]) == {"0", "1"}
    assert thresholds["quantile"] == 0.5 and thresholds["calibration"] == "general"
    for variant in ("pruned", "original"):
        assert abs(thresholds["skipped_fraction"][variant]["layers"]["0"] - 0.5) <= 1 / 256
        assert abs(thresholds["skipped_fraction"][variant]["second_expert"] - 0.5) <= 0.05
    config = json.loads((out / "skip" / "model" / "config.json").read_text())
    assert config["expert_skip_thresholds"] == thresholds["pruned"]
    assert config["kept_experts"] == {str(k): v for k, v in selection.kept.items()}
    metrics = json.loads((out / "skip" / "metrics.json").read_text())
    assert metrics["beta/pruned/layer_0"] == thresholds["pruned"]["0"]
    assert (out / "skip" / "run.json").is_file()

    # a calibration set that does not exist: one line naming the key, previous outputs untouched
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["calibration"]["sets"]["other"] = params["calibration"]["sets"]["general"]
    params["skip"]["calibration"] = "other"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    before = sha256_file(out / "skip" / "thresholds.json")
    result = _run(project, "skip_calibration")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: skip_calibration: skip.calibration:")
    assert sha256_file(out / "skip" / "thresholds.json") == before


def test_export_stage(tmp_path: Path) -> None:
    pytest.importorskip("pipeline.activations", reason="the activations cache module lands with the activations stage")
    project = _project(tmp_path)
    out = project / "outputs"
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    model = load_model(out / "model" / "checkpoint")
    ids = load_tensors(out / "calibration" / "general.safetensors")["input_ids"]
    xs = cached_inputs(model, ids)
    files = {}
    for i, x in xs.items():
        path = out / "activations" / "layers" / f"layer_{i:03d}.safetensors"
        save_tensors(path, {"x": x})
        files[str(i)] = {"file": f"layers/{path.name}", "sha256": sha256_file(path)}
    write_json(
        out / "activations" / "manifest.json",
        {"model_fingerprint": manifest["fingerprint"], "calibration": "general", "calibration_fingerprint": "",
         "dtype": "float32", "num_samples": 8, "seq_len": 32, "hidden_size": 32, "moe_layers": [0, 1], "files": files},
    )
    data = selection_dict(model, r=6, model_fingerprint=manifest["fingerprint"])
    write_json(out / "search" / "selection.json", data)

    result = _run(project, "export")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "export" / "metrics.json").read_text())
    assert metrics["params_after"] < metrics["params_before"]
    assert metrics["equivalence_max_rel_error"] < 1e-5
    assert len(list((out / "export" / "model").glob("*.safetensors"))) > 1
    assert json.loads((out / "export" / "model" / "config.json").read_text())["num_local_experts"] == 6

    data["model_fingerprint"] = "0000000000000000"
    write_json(out / "search" / "selection.json", data)
    result = _run(project, "export")
    assert result.returncode == 2
    assert "made for model 0000000000000000" in result.stderr.strip().splitlines()[-1]
