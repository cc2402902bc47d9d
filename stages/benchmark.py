"""Stage benchmark: lm-eval accuracy/perplexity, speed and memory of original, pruned and skip variants.

Writes outputs/benchmark/{metrics.json, report.md, results/, plots/}; one MLflow child run per
variant (under this stage's run) carries the upstream settings that produced it, its results with
their 95% intervals, and its verdicts against the original as ``verdict/...`` tags.
"""

from __future__ import annotations

import logging
import os

# lm-eval and datasets read these at import time: evaluation never downloads (cached data only)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.evaluate import BenchmarkSetup, build_metrics, run_benchmark, write_plots  # noqa: E402
from pipeline.evaluate.report import check_metrics, flat_metrics, verdict_tags, write_report  # noqa: E402
from pipeline.evaluate.runner import ITEMS_SUFFIX, build_variants, describe_settings, variant_params  # noqa: E402
from pipeline.io import read_json, write_json  # noqa: E402
from pipeline.models.loading import ModelManifest, checkpoint_fingerprint  # noqa: E402
from pipeline.runtime import resolve_device, resolve_dtype  # noqa: E402
from stages.common import StageContext, stage, stage_dir  # noqa: E402

log = logging.getLogger("stages.benchmark")


@stage("benchmark")
def main(ctx: StageContext) -> None:
    p, rt = ctx.params.benchmark, ctx.params.runtime
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)  # expected notes on in-memory models
    manifest_file = stage_dir("model") / "manifest.json"
    manifest = ModelManifest.load(manifest_file)
    if checkpoint_fingerprint(manifest.path) != manifest.fingerprint:
        raise PipelineError(
            f"{manifest_file}: the checkpoint at {manifest.path} changed since the model stage (run: dvc repro model)"
        )
    selection = read_json(stage_dir("search") / "selection.json", what="pruning selection")
    thresholds_file = stage_dir("skip_calibration") / "thresholds.json"
    names = list(p.variants)
    if p.backend == "vllm" and any(n.endswith("_skip") for n in names):  # pruned_top1 is refused by the runner
        log.warning("benchmark.backend vllm cannot run dynamic expert skipping: skip variants are left out")
        names = [n for n in names if not n.endswith("_skip")]
    thresholds = read_json(thresholds_file, what="skip thresholds") if any(n.endswith("_skip") for n in names) else None
    variants = build_variants(
        names,
        manifest.path,
        stage_dir("export") / "model",
        thresholds,
        str(thresholds_file),
        manifest.moe_layers,
        merged=stage_dir("export") / "merged",
        recovered=stage_dir("recover") / "model",
    )
    device = resolve_device(rt.device)
    settings = BenchmarkSetup(p, device, resolve_dtype(rt.dtype, device), rt.trust_remote_code)
    results = run_benchmark(variants, settings, stage_dir("corpus") / "eval", ctx.out / "results")
    metrics = build_metrics(results)
    check_metrics(metrics)
    write_json(ctx.out / "metrics.json", metrics)
    merged_config = stage_dir("export") / "merged" / "config.json"
    merging = read_json(merged_config, what="merged model config").get("merging") if merged_config.is_file() else None
    report_settings = describe_settings(vars(manifest), selection, thresholds, settings, merging)
    write_report(metrics, ctx.out / "report.md", report_settings)
    plots = write_plots(metrics, ctx.out / "plots")

    for v, r in zip(variants, results, strict=True):
        entry = metrics["variants"][v.name]
        params = variant_params(v, vars(manifest), selection, thresholds, r.experts_per_layer)
        if v.recovered:  # the recover stage's settings, as recorded in the checkpoint it wrote
            recovery = read_json(v.checkpoint / "config.json", what="recovered model config").get("recovery") or {}
            params.update({f"recover.{k}": recovery[k] for k in ("steps", "targets", "lr_router", "lr_lora", "calibration") if k in recovery})
        with ctx.run.child(
            v.name,
            params=params,
            tags=verdict_tags(entry),
        ) as child:
            child.log_metrics(flat_metrics(entry))
            child.log_artifact(ctx.out / "results" / f"{v.name}.json", "results")
            child.log_artifact(ctx.out / "results" / f"{v.name}{ITEMS_SUFFIX}", "results")
        flat = flat_metrics(entry)
        keys = ("average_accuracy", "average_accuracy_ci_low", "average_accuracy_ci_high", "tokens_per_s", "speedup",
                "speedup_ci_low", "speedup_ci_high", "weight_bytes")
        ctx.run.log_metrics({f"{v.name}/{k}": flat[k] for k in keys if k in flat})
    for path in [ctx.out / "report.md", ctx.out / "metrics.json", ctx.out / "results" / "speed.json", *plots]:
        ctx.run.log_artifact(path, "plots" if path.parent.name == "plots" else None)


if __name__ == "__main__":
    main()
