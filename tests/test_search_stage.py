"""The `search` DVC stage end to end: real upstream files (per docs/architecture.md), real MLflow.

Upstream outputs (model manifest and checkpoint, calibration tokens, activation cache) are written
here exactly as their contracts describe, from a tiny random Mixtral, so the stage runs alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytest.importorskip("pipeline.activations")

from pipeline.io import load_tensors, save_tensors, sha256_file, write_json  # noqa: E402
from pipeline.models import get_adapter  # noqa: E402
from pipeline.models.loading import build_manifest, load_model  # noqa: E402
from pipeline.streaming import stream_layers  # noqa: E402
from tests.factory import save_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES, SEQ_LEN = 4, 16
pytestmark = pytest.mark.slow


def write_upstream(root: Path, *, model_fingerprint: str | None = None) -> None:
    """outputs/{model,calibration,activations} for a tiny 3-layer Mixtral (8 experts, top-2)."""
    out = root / "outputs"
    ckpt = save_tiny_checkpoint(out / "model" / "checkpoint", layers=3, seed=11)
    manifest = build_manifest("tiny", ckpt, None)
    manifest.save(out / "model" / "manifest.json")
    write_json(out / "model" / "run.json", {"run_id": None})
    gen = torch.Generator().manual_seed(0)
    for name in ("general", "arith"):
        ids = torch.randint(0, 320, (SAMPLES, SEQ_LEN), generator=gen)
        save_tensors(out / "calibration" / f"{name}.safetensors", {"input_ids": ids})
    write_json(out / "calibration" / "run.json", {"run_id": None})
    model = load_model(ckpt)
    adapter = get_adapter(model.config)
    ids = load_tensors(out / "calibration" / "general.safetensors")["input_ids"]
    files: dict[str, Any] = {}
    for step in stream_layers(model, adapter, ids, batch_size=2, device=torch.device("cpu"), progress=False):
        if step.block is None:
            continue
        rel = f"layers/layer_{step.index:03d}.safetensors"
        path = save_tensors(out / "activations" / rel, {"x": step.moe_tokens().reshape(SAMPLES, SEQ_LEN, -1)})
        files[str(step.index)] = {"file": rel, "sha256": sha256_file(path)}
    write_json(out / "activations" / "manifest.json", {
        "model_fingerprint": model_fingerprint or manifest.fingerprint,
        "calibration": "general",
        "calibration_fingerprint": sha256_file(out / "calibration" / "general.safetensors"),
        "dtype": "float32",
        "num_samples": SAMPLES,
        "seq_len": SEQ_LEN,
        "hidden_size": model.config.hidden_size,
        "moe_layers": [int(i) for i in files],
        "files": files,
    })
    write_json(out / "activations" / "run.json", {"run_id": None})


def write_params(root: Path, **search: Any) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["source"] = str(root / "outputs" / "model" / "checkpoint")
    params["tracking"]["experiment"] = "search-test"
    for cs in params["calibration"]["sets"].values():
        cs.update(num_samples=SAMPLES, seq_len=SEQ_LEN)
    params["search"].update({"r": 4, **search})
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def run_stage(root: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
               HF_HUB_OFFLINE="1", PARAMS_FILE=str(root / "params.yaml"))
    return subprocess.run([sys.executable, "-m", "stages.search"], cwd=root, env=env, capture_output=True, text=True, timeout=600)


def test_stage_writes_selection_tables_plots_metrics_and_mlflow_run(tmp_path: Path) -> None:
    write_upstream(tmp_path)
    write_params(tmp_path)
    proc = run_stage(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "candidates per layer" in proc.stderr and "estimated" in proc.stderr
    out = tmp_path / "outputs" / "search"
    sel = json.loads((out / "selection.json").read_text())
    assert (sel["strategy"], sel["requested_strategy"], sel["mode"], sel["r"]) == ("enumerate", "auto", "layerwise", 4)
    assert (sel["calibration"], sel["num_experts"], sel["top_k"]) == ("general", 8, 2)
    assert [layer["layer"] for layer in sel["layers"]] == [0, 1, 2]
    for layer in sel["layers"]:
        assert len(layer["kept"]) == 4 and layer["kept"] == sorted(layer["kept"]) and layer["candidates_evaluated"] == 70
        assert set(layer["baselines"]) == {"frequency", "random", "reap"}
        assert all(layer["loss"] <= b["loss"] for b in layer["baselines"].values())
    assert len((out / "tables" / "candidates.csv").read_text().splitlines()) == 1 + 3 * 70
    for name in ("loss_distribution.png", "usage_general.png", "usage_arith.png", "data/loss_chosen.json", "data/usage_arith.json"):
        assert (out / "plots" / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss"] == pytest.approx(sum(layer["loss"] for layer in sel["layers"]))
    assert set(metrics["layers"]["1"]) >= {"loss", "loss_frequency", "loss_random", "loss_reap", "candidates_evaluated"}
    assert not list((tmp_path / "outputs" / ".work" / "search").glob("*"))  # work dir removed after the commit

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(json.loads((out / "run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["layer_002.loss"] == pytest.approx(sel["layers"][2]["loss"])
    assert run.data.metrics["loss_reap"] == pytest.approx(metrics["baselines"]["reap"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "plots")
    }
    assert {"selection.json", "plots/loss_distribution.png", "plots/usage_general.png"} <= logged


def test_progressive_stage_agrees_with_layerwise_on_layer_zero(tmp_path: Path) -> None:
    write_upstream(tmp_path)
    write_params(tmp_path, mode="progressive", baselines=["frequency"])
    assert run_stage(tmp_path).returncode == 0
    prog = json.loads((tmp_path / "outputs" / "search" / "selection.json").read_text())
    write_params(tmp_path, baselines=["frequency"])
    assert run_stage(tmp_path).returncode == 0
    flat = json.loads((tmp_path / "outputs" / "search" / "selection.json").read_text())
    assert prog["mode"] == "progressive" and flat["mode"] == "layerwise"
    assert prog["layers"][0]["kept"] == flat["layers"][0]["kept"]
    assert prog["layers"][0]["loss"] == pytest.approx(flat["layers"][0]["loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("search", "fingerprint", "expected"),
    [
        ({"r": 8}, None, "search.r: must be below the model's 8 experts"),
        ({"r": 1}, None, "search.r: must be at least the model's top_k=2"),
        ({"r": 0}, None, "search.r: must be a positive number"),
        ({"calibration": "nope"}, None, "search.calibration: calibration set 'nope' does not exist"),
        ({}, "0123456789abcdef", "the activations were made from another model"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, search: dict[str, Any], fingerprint: str | None, expected: str) -> None:
    write_upstream(tmp_path, model_fingerprint=fingerprint)
    write_params(tmp_path, **search)
    proc = run_stage(tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / "outputs" / "search").exists()
    assert not (tmp_path / "outputs" / ".work" / "search").exists()


def test_missing_calibration_file_names_the_param(tmp_path: Path) -> None:
    write_upstream(tmp_path)
    (tmp_path / "outputs" / "calibration" / "arith.safetensors").unlink()
    write_params(tmp_path, calibration="arith")
    proc = run_stage(tmp_path)
    assert proc.returncode == 2
    assert "error: search: search.calibration:" in proc.stderr and "arith.safetensors does not exist" in proc.stderr
    assert not (tmp_path / "outputs" / "search").exists()
