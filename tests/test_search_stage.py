"""The `search` DVC stage end to end: real upstream files (per docs/architecture.md), real MLflow.

Upstream outputs (model manifest and checkpoint, calibration tokens, activation cache) are written
here exactly as their contracts describe, from a tiny random Mixtral, so the stage runs alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.io import save_tensors, sha256_file, write_json
from pipeline.models import get_adapter
from pipeline.models.loading import build_manifest, load_model
from pipeline.search.report import usage_shares
from pipeline.search.run import routing_usage
from pipeline.streaming import stream_layers
from tests.factory import save_tiny_checkpoint
from tests.project import run_stage, stage_dir_project, write_calibration_set, write_run_records

SAMPLES, SEQ_LEN = 4, 16
pytestmark = pytest.mark.slow


def write_upstream(root: Path, *, model_fingerprint: str | None = None) -> dict[str, torch.Tensor]:
    """outputs/{model,calibration/<set>,activations} for a tiny 3-layer Mixtral (8 experts, top-2);
    returns each calibration set's tokens."""
    out = root / "outputs"
    ckpt = save_tiny_checkpoint(out / "model" / "checkpoint", layers=3, seed=11)
    manifest = build_manifest("tiny", ckpt, None)
    manifest.save(out / "model" / "manifest.json")
    gen = torch.Generator().manual_seed(0)
    sets = {name: torch.randint(0, 320, (SAMPLES, SEQ_LEN), generator=gen) for name in ("general", "arith")}
    fingerprints = {name: json.loads((write_calibration_set(root, name, ids) / "manifest.json").read_text())["fingerprint"]
                    for name, ids in sets.items()}
    model = load_model(ckpt)
    adapter = get_adapter(model.config)
    files: dict[str, Any] = {}
    for step in stream_layers(model, adapter, sets["general"], batch_size=2, device=torch.device("cpu"), progress=False):
        if step.block is None:
            continue
        rel = f"layers/layer_{step.index:03d}.safetensors"
        path = save_tensors(out / "activations" / rel, {"x": step.moe_tokens().reshape(SAMPLES, SEQ_LEN, -1)})
        files[str(step.index)] = {"file": rel, "sha256": sha256_file(path)}
    write_json(out / "activations" / "manifest.json", {
        "model_fingerprint": model_fingerprint or manifest.fingerprint,
        "calibration": "general",
        "calibration_fingerprint": fingerprints["general"],
        "dtype": "float32",
        "num_samples": SAMPLES,
        "seq_len": SEQ_LEN,
        "hidden_size": model.config.hidden_size,
        "moe_layers": [int(i) for i in files],
        "files": files,
    })
    write_run_records(root, "model", "activations")
    return sets


def write_params(root: Path, **search: Any) -> None:
    """dvc.yaml and the repo's params.yaml in ``root``, pointed at the tiny checkpoint and sets."""
    size = {"num_samples": SAMPLES, "seq_len": SEQ_LEN}
    stage_dir_project(root, {
        "model": {"source": str(root / "outputs" / "model" / "checkpoint")},
        "tracking": {"experiment": "search-test"},
        "calibration": {"sets": {"general": size, "arith": size}},
        "search": {"r": 4, **search},
    })


def test_stage_writes_selection_tables_plots_metrics_and_mlflow_run(tmp_path: Path) -> None:
    write_params(tmp_path)
    sets = write_upstream(tmp_path)
    proc = run_stage(tmp_path, "search")
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
    for name in ("loss_distribution.png", "usage.png", "data/loss_chosen.json", "data/usage.json"):
        assert (out / "plots" / name).is_file(), name
    assert not list((out / "plots").glob("usage_*")) and not list((out / "plots" / "data").glob("usage_*"))
    # Usage is the original model's routing on the search's own set (general), not on any other set.
    model = load_model(tmp_path / "outputs" / "model" / "checkpoint")
    layers, shares = usage_shares(routing_usage(model, get_adapter(model.config), model.config, sets["general"],
                                                batch_size=2, device="cpu"))
    rows = json.loads((out / "plots" / "data" / "usage.json").read_text())
    assert [(r["layer"], r["expert"]) for r in rows] == [(layer, e) for layer in layers for e in range(8)] and layers == [0, 1, 2]
    assert [r["share"] for r in rows] == pytest.approx(shares.reshape(-1).tolist())
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
    assert {"selection.json", "plots/loss_distribution.png", "plots/usage.png"} <= logged


def test_progressive_stage_agrees_with_layerwise_on_layer_zero(tmp_path: Path) -> None:
    write_params(tmp_path, mode="progressive", baselines=["frequency"])
    write_upstream(tmp_path)
    proc = run_stage(tmp_path, "search")
    assert proc.returncode == 0, proc.stderr
    prog = json.loads((tmp_path / "outputs" / "search" / "selection.json").read_text())
    prog_usage = json.loads((tmp_path / "outputs" / "search" / "plots" / "data" / "usage.json").read_text())
    write_params(tmp_path, baselines=["frequency"])
    proc = run_stage(tmp_path, "search")
    assert proc.returncode == 0, proc.stderr
    flat = json.loads((tmp_path / "outputs" / "search" / "selection.json").read_text())
    assert prog["mode"] == "progressive" and flat["mode"] == "layerwise"
    assert prog["layers"][0]["kept"] == flat["layers"][0]["kept"]
    assert prog["layers"][0]["loss"] == pytest.approx(flat["layers"][0]["loss"], rel=1e-6)
    # Both modes plot the original model's usage on the same set: the same shares.
    flat_usage = json.loads((tmp_path / "outputs" / "search" / "plots" / "data" / "usage.json").read_text())
    assert [r["share"] for r in prog_usage] == pytest.approx([r["share"] for r in flat_usage])


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
    write_params(tmp_path, **search)
    write_upstream(tmp_path, model_fingerprint=fingerprint)
    proc = run_stage(tmp_path, "search")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / "outputs" / "search").exists()
    assert not (tmp_path / "outputs" / ".work" / "search").exists()


def test_missing_calibration_file_names_the_param(tmp_path: Path) -> None:
    write_params(tmp_path, calibration="arith")
    write_upstream(tmp_path)
    missing = tmp_path / "outputs" / "calibration" / "arith" / "input_ids.safetensors"
    missing.unlink()  # the set's run.json stays: the stage itself must notice
    proc = run_stage(tmp_path, "search")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: search: search.calibration: calibration set 'arith' is not built ({Path('outputs/calibration/arith/input_ids.safetensors')} "
        "is missing); check calibration.sets.arith and run dvc repro calibration@arith"
    ], proc.stderr
    assert not (tmp_path / "outputs" / "search").exists()


def test_global_allocation_through_search_and_export_stages(tmp_path: Path) -> None:
    """search.allocation: global: per-layer counts in selection.json, budget plot, MLflow; export loads per layer."""
    write_params(tmp_path, allocation="global", strategy="greedy")
    write_upstream(tmp_path)
    proc = run_stage(tmp_path, "search")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "outputs" / "search"
    sel = json.loads((out / "selection.json").read_text())
    counts = [layer["r"] for layer in sel["layers"]]
    assert sel["allocation"] == "global" and sum(counts) == sel["total_experts"] == 4 * 3
    assert all(len(layer["kept"]) == layer["r"] and [p["r"] for p in layer["curve"]] == list(range(2, 9))
               for layer in sel["layers"])
    metrics = json.loads((out / "metrics.json").read_text())
    relative = sum(layer["relative_loss"] for layer in sel["layers"])
    uniform = sum(layer["baselines"]["uniform"]["loss"] / layer["output_norm"] for layer in sel["layers"])
    assert relative <= uniform + 1e-12 and metrics["baselines"]["uniform"] > 0
    assert (out / "plots" / "budget.png").is_file() and (out / "plots" / "data" / "budget.json").is_file()
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(json.loads((out / "run.json").read_text())["run_id"])
    assert run.data.tags["search.allocation"] == "global" and "loss_uniform" in run.data.metrics
    proc = run_stage(tmp_path, "export")
    assert proc.returncode == 0, proc.stderr
    exported = tmp_path / "outputs" / "export" / "model"
    config = json.loads((exported / "config.json").read_text())
    if len(set(counts)) > 1:
        assert config["experts_per_layer"] == {str(layer["layer"]): layer["r"] for layer in sel["layers"]}
    model = load_model(exported)
    adapter = get_adapter(model.config)
    assert [adapter.block_num_experts(adapter.moe_block(layer)) for layer in adapter.decoder_layers(model)] == counts
