"""Stage skip_calibration: per-layer skip thresholds for the pruned and the original model.

Reads outputs/export/model, outputs/model/manifest.json and the calibration set skip.calibration;
writes outputs/skip/thresholds.json and outputs/skip/model/ (the exported checkpoint with
expert_skip_thresholds in its config, weights hard-linked).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.io import load_tensors, read_json, write_json
from pipeline.models import get_adapter
from pipeline.models.loading import ModelManifest, load_model
from pipeline.runtime import resolve_device, resolve_dtype
from pipeline.skipping import RULE, calibrate_thresholds, measure_skipping, write_skip_checkpoint
from stages.common import StageContext, stage, stage_dir


def _thresholds_and_stats(path: Path, input_ids: Any, ctx: StageContext, label: str) -> tuple[dict[int, float], dict[str, Any]]:
    p = ctx.params
    device = resolve_device(p.runtime.device)
    dtype = resolve_dtype(p.runtime.dtype, device)
    model = load_model(path, dtype=dtype, device="cpu", trust_remote_code=p.runtime.trust_remote_code)
    adapter = get_adapter(model.config)
    thresholds = calibrate_thresholds(model, adapter, input_ids, p.skip.quantile, p.skip.batch_size, device)
    stats = measure_skipping(model, adapter, input_ids, thresholds, p.skip.batch_size, device)
    del model
    gc.collect()
    metrics = {f"beta/{label}/layer_{i}": b for i, b in thresholds.items()}
    metrics.update({f"{key}/{label}": stats[key] for key in ("skipped_fraction", "second_expert_skipped_fraction", "evals_per_token")})
    metrics.update({f"second_expert_skipped/{label}/layer_{i}": s["second_expert_skipped_fraction"] for i, s in stats["layers"].items()})
    ctx.log_metrics(metrics)
    return thresholds, stats


@stage("skip_calibration", sections=("skip", "runtime"), upstream=("model", "calibration", "export"))
def main(ctx: StageContext) -> None:
    name = ctx.params.skip.calibration
    calib = stage_dir("calibration") / f"{name}.safetensors"
    if not calib.is_file():
        raise PipelineError(f"skip.calibration: {calib} does not exist (run: dvc repro calibration)")
    input_ids = load_tensors(calib, what="calibration set")["input_ids"]
    exported = stage_dir("export") / "model"
    manifest = ModelManifest.load(stage_dir("model") / "manifest.json")
    made_from = (read_json(exported / "config.json", what="exported model config").get("pruning") or {}).get("source_fingerprint")
    if made_from != manifest.fingerprint:
        raise PipelineError(f"{exported}: exported from model {made_from}, the model stage's is {manifest.fingerprint} (rerun: dvc repro export)")
    pruned, pruned_stats = _thresholds_and_stats(exported, input_ids, ctx, "pruned")
    original, original_stats = _thresholds_and_stats(Path(manifest.path), input_ids, ctx, "original")
    summary = {
        label: {
            "slots": s["skipped_fraction"],
            "second_expert": s["second_expert_skipped_fraction"],
            "layers": {i: v["second_expert_skipped_fraction"] for i, v in s["layers"].items()},
        }
        for label, s in (("pruned", pruned_stats), ("original", original_stats))
    }
    write_json(
        ctx.out / "thresholds.json",
        {
            "quantile": ctx.params.skip.quantile,
            "calibration": name,
            "rule": RULE,
            "pruned": {str(i): b for i, b in pruned.items()},
            "original": {str(i): b for i, b in original.items()},
            "skipped_fraction": summary,
        },
    )
    write_skip_checkpoint(exported, ctx.out / "model", pruned)
    ctx.run.log_artifact(ctx.out / "thresholds.json")
    ctx.run.log_reference("model", stage_dir("skip_calibration") / "model")


if __name__ == "__main__":
    main()
