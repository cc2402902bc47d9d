"""Stage skip_calibration: per-layer skip thresholds for the pruned, merged, recovered and original model.

Reads outputs/export/model (and outputs/export/merged when it holds a checkpoint: export.merge),
outputs/recover/model (thresholds calibrated on the recovered model itself; the pruned model's when
its files equal the export's, as under recover.steps: 0),
outputs/model/manifest.json and the calibration set skip.calibration;
writes outputs/skip/thresholds.json and outputs/skip/model/ (the exported checkpoint with
expert_skip_thresholds in its config, weights hard-linked).
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.calibration import load_calibration_set
from pipeline.io import write_json
from pipeline.models import get_adapter
from pipeline.models.loading import ModelManifest, checkpoint_fingerprint, load_config, load_model
from pipeline.runtime import resolve_device, resolve_dtype
from pipeline.skipping import RULE, calibrate_thresholds, measure_skipping, write_skip_checkpoint
from stages.common import StageContext, calibration_dir, check_exported_from, stage, stage_dir

log = logging.getLogger("stages.skip_calibration")


def calibrate(ctx: StageContext, path: Path, input_ids: torch.Tensor, label: str) -> tuple[dict[int, float], dict[str, Any]]:
    """Thresholds of the model at ``path`` and the skipping measured with them; logs both."""
    p = ctx.params
    device = resolve_device(p.runtime.device)
    model = load_model(
        path, dtype=resolve_dtype(p.runtime.dtype, device), trust_remote_code=p.runtime.trust_remote_code,
        offload=p.runtime.offload,
    )
    adapter = get_adapter(model.config)
    thresholds = calibrate_thresholds(model, adapter, input_ids, p.skip.quantile, p.skip.batch_size, device)
    stats = measure_skipping(model, adapter, input_ids, thresholds, p.skip.batch_size, device)
    del model
    gc.collect()
    metrics = {f"beta/{label}/layer_{i}": b for i, b in thresholds.items()}
    for key in ("skipped_fraction", "second_expert_skipped_fraction", "evals_per_token"):
        metrics[f"{key}/{label}"] = stats[key]
    for i, layer in stats["layers"].items():
        metrics[f"second_expert_skipped/{label}/layer_{i}"] = layer["second_expert_skipped_fraction"]
    ctx.log_metrics(metrics)
    summary = {
        "slots": stats["skipped_fraction"],
        "second_expert": stats["second_expert_skipped_fraction"],
        "layers": {i: layer["second_expert_skipped_fraction"] for i, layer in stats["layers"].items()},
    }
    return thresholds, summary


@stage("skip_calibration")
def main(ctx: StageContext) -> None:
    name = ctx.params.skip.calibration
    input_ids = load_calibration_set(calibration_dir(name), name, key="skip.calibration").input_ids
    exported = stage_dir("export") / "model"
    manifest = ModelManifest.load(stage_dir("model") / "manifest.json")
    check_exported_from(exported, manifest.fingerprint)
    models = {"pruned": exported, "original": Path(manifest.path)}
    merged = stage_dir("export") / "merged"
    if (merged / "config.json").is_file():
        models["merged"] = merged
    recovered = stage_dir("recover") / "model"
    same_as_pruned = False
    if (recovered / "config.json").is_file():
        models["recovered"] = recovered
        same_as_pruned = checkpoint_fingerprint(recovered) == checkpoint_fingerprint(exported)
    tables: dict[str, Any] = {}
    summaries: dict[str, Any] = {}
    for label, path in models.items():
        if label == "recovered" and same_as_pruned:  # the same weights: the same thresholds, not measured twice
            tables[label], summaries[label] = tables["pruned"], summaries["pruned"]
            continue
        config = load_config(path, ctx.params.runtime.trust_remote_code)
        if get_adapter(config).top_k(config) < 2:
            log.warning("%s: routes each token to one expert (export.top_k): nothing to skip, thresholds 0", path)
            tables[label], summaries[label] = {str(i): 0.0 for i in manifest.moe_layers}, {}
            continue
        table, summaries[label] = calibrate(ctx, path, input_ids, label)
        tables[label] = {str(i): b for i, b in table.items()}
    write_json(
        ctx.out / "thresholds.json",
        {
            "quantile": ctx.params.skip.quantile,
            "calibration": name,
            "rule": RULE,
            **tables,
            "skipped_fraction": summaries,
        },
    )
    pruned = {int(i): b for i, b in tables["pruned"].items()}
    write_skip_checkpoint(exported, ctx.out / "model", pruned)
    ctx.run.log_artifact(ctx.out / "thresholds.json")
    ctx.run.log_reference("model", stage_dir("skip_calibration") / "model")


if __name__ == "__main__":
    main()
