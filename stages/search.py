"""DVC stage `search`: choose the `search.r` experts each MoE layer keeps (method.md §2, §5, §6).

Writes `outputs/search/selection.json`, `tables/` (every scored set's loss; baselines),
`plots/` (loss distribution per layer; expert usage on the search's calibration set) and `metrics.json`.
Finished layers survive a crash in `outputs/.work/search/<key>/`; a rerun resumes after them.
"""

from __future__ import annotations

from pipeline.activations import ActivationCache
from pipeline.calibration import load_calibration_set
from pipeline.config import validate_r
from pipeline.errors import PipelineError
from pipeline.io import remove_path, sha256_file, write_json
from pipeline.models import get_adapter
from pipeline.models.loading import ModelManifest, checkpoint_fingerprint, load_model
from pipeline.runtime import cuda_peak_bytes, dtype_name, resolve_device, resolve_dtype, seed_everything
from pipeline.search import report
from pipeline.search.allocation import allocate
from pipeline.search.run import LayerResult, routing_usage, run_layerwise, run_progressive
from stages.common import StageContext, calibration_dir, stage, stage_dir

#: Larger outputs are recorded in MLflow by path and hash instead of being copied.
MAX_ARTIFACT_BYTES = 50 << 20


@stage("search")
def main(ctx: StageContext) -> None:
    """Validate, search every MoE layer, write the selection with tables, plots and metrics."""
    p, runtime = ctx.params.search, ctx.params.runtime
    manifest = ModelManifest.load(stage_dir("model") / "manifest.json")
    validate_r(p.r, manifest.num_experts, manifest.top_k)
    calib = load_calibration_set(calibration_dir(p.calibration), p.calibration, key="search.calibration")
    cache = ActivationCache(stage_dir("activations"), manifest.fingerprint)
    if cache.calibration != p.calibration:
        raise PipelineError(
            f"search.calibration: the activations were computed on {cache.calibration!r}, not {p.calibration!r}; "
            "rerun dvc repro activations"
        )
    if checkpoint_fingerprint(manifest.path) != manifest.fingerprint:
        raise PipelineError(f"{manifest.path}: checkpoint changed since the model stage ran; rerun it (dvc repro model)")
    device = resolve_device(runtime.device)
    dtype = resolve_dtype(runtime.dtype, device)
    seed_everything(p.seed)
    model = load_model(
        manifest.path, dtype=dtype, device="cpu", trust_remote_code=runtime.trust_remote_code, offload=runtime.offload
    )
    adapter = get_adapter(model.config)
    work = ctx.work_dir({
        "model": manifest.fingerprint,
        "activations": cache.manifest["files"],
        "calibration": calib.fingerprint,
        "search": p.model_dump(mode="json"),
        "device": device.type,
        "dtype": dtype_name(dtype),
    })
    batch_size = ctx.params.activations.batch_size
    # Expert usage of the original model on the calibration set (progressive mode prunes the model: first).
    usage = (
        routing_usage(model, adapter, model.config, calib.input_ids, batch_size=batch_size, device=device)
        if p.mode == "progressive"
        else {}
    )

    resumed_layers: list[int] = []
    peaks: list[int] = []
    cuda_peak_bytes(device)

    def on_layer(result: LayerResult, resumed: bool) -> None:
        if resumed:
            resumed_layers.append(result.layer)
        row = {"layer.loss": result.loss, **{f"layer.loss_{k}": b["loss"] for k, b in result.baselines.items()}}
        peak = cuda_peak_bytes(device)  # this layer's peak (GPU memory must not grow with the layer count)
        if peak is not None and not resumed:
            row["layer.peak_cuda_bytes"] = peak
            peaks.append(peak)
        ctx.run.log_metrics(row, step=result.layer)  # a series over layers in the MLflow UI

    if p.mode == "layerwise":
        results = run_layerwise(model, adapter, model.config, cache.layers, cache.load, p,
                                device=device, work_dir=work, on_layer=on_layer)
        usage = {r.layer: r.usage for r in results}
        if p.allocation == "global":
            results = allocate(results, p.r)
    else:
        results = run_progressive(model, adapter, model.config, calib.input_ids, p, batch_size=batch_size,
                                  device=device, work_dir=work, on_layer=on_layer)

    doc = report.selection(results, p, calibration=p.calibration, model_fingerprint=manifest.fingerprint,
                           num_experts=manifest.num_experts, top_k=manifest.top_k)
    write_json(ctx.out / "selection.json", doc)
    files = report.write_tables(ctx.out / "tables", results)
    files += report.write_plots(ctx.out / "plots", results, usage, search_set=p.calibration,
                                strategy=doc["strategy"], r=p.r, n=manifest.num_experts)
    metrics, flat = report.metrics(results, sum(r.seconds for r in results))
    if peaks:
        metrics["peak_cuda_bytes"] = flat["peak_cuda_bytes"] = max(peaks)
    write_json(ctx.out / "metrics.json", metrics)
    ctx.run.log_metrics(flat)
    ctx.run.set_tags({"search.strategy": doc["strategy"], "search.resumed_layers": len(resumed_layers),
                      "search.allocation": p.allocation})
    ctx.run.log_artifact(ctx.out / "selection.json")
    for path in files:
        if path.stat().st_size > MAX_ARTIFACT_BYTES:  # e.g. the candidate table of a large enumeration
            ctx.run.log_reference(path.name, stage_dir("search") / path.relative_to(ctx.out), sha256_file(path))
        else:
            ctx.run.log_artifact(path, artifact_path=str(path.parent.relative_to(ctx.out)))
    ctx.after_commit.append(lambda: remove_path(work))


if __name__ == "__main__":
    main()
