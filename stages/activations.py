"""DVC stage `activations`: cache every MoE block's input on the calibration set `search.calibration`.

Runs the model one decoder layer at a time on `runtime.device` and writes
`outputs/activations/layers/layer_<iii>.safetensors` (`x` `[N, L, d]` in `activations.dtype`) and
`manifest.json`. Work in progress survives a crash in `outputs/.work/activations/<key>/`; a rerun
continues at the first incomplete layer.
"""

from __future__ import annotations

from pipeline.activations import cache_activations, checkpoint_state_key, commit_cache
from pipeline.io import remove_path
from pipeline.calibration import load_calibration_set
from pipeline.models import get_adapter
from pipeline.errors import PipelineError
from pipeline.models.loading import ModelManifest, checkpoint_fingerprint, load_model
from pipeline.runtime import DTYPES, cuda_peak_bytes, dtype_name, resolve_device, resolve_dtype
from stages.common import StageContext, calibration_dir, stage, stage_dir


@stage("activations")
def main(ctx: StageContext) -> None:
    """Stream the model layer by layer and write the MoE inputs."""
    p = ctx.params
    manifest = ModelManifest.load(stage_dir("model") / "manifest.json")
    if checkpoint_fingerprint(manifest.path) != manifest.fingerprint:
        raise PipelineError(f"{manifest.path}: checkpoint changed since the model stage ran; rerun it (dvc repro model)")
    calib = load_calibration_set(calibration_dir(p.search.calibration), p.search.calibration, key="search.calibration")
    device = resolve_device(p.runtime.device)
    compute_dtype = resolve_dtype(p.runtime.dtype, device)
    store_dtype = DTYPES[p.activations.dtype]
    model = load_model(
        manifest.path, dtype=compute_dtype, device="cpu", trust_remote_code=p.runtime.trust_remote_code, offload=p.runtime.offload
    )
    adapter = get_adapter(model.config)
    key = {
        "model": manifest.fingerprint,
        "checkpoint": checkpoint_state_key(manifest.path),
        "calibration": calib.fingerprint,
        "activations": p.activations.model_dump(mode="json"),
        "device": device.type,
        "compute_dtype": dtype_name(compute_dtype),
    }
    work = ctx.work_dir(key)
    cuda_peak_bytes(device)  # per-layer peaks from here on
    run = cache_activations(
        model,
        adapter,
        calib.input_ids,
        work_dir=work,
        dtype=store_dtype,
        batch_size=p.activations.batch_size,
        device=device,
        on_layer=lambda info: ctx.log_metrics(
            {
                "layer.tokens_per_s": info.tokens_per_s,
                "layer.bytes_written": info.bytes_written,
                **({"layer.peak_cuda_bytes": peak} if (peak := cuda_peak_bytes(device)) is not None else {}),
            },
            step=info.layer,
        ),
    )
    commit_cache(
        run,
        ctx.out,
        model_fingerprint=manifest.fingerprint,
        calibration=calib.name,
        calibration_fingerprint=calib.fingerprint,
        extra={"compute_dtype": dtype_name(compute_dtype), "device": device.type, "batch_size": p.activations.batch_size},
    )
    shard_bytes = sum(path.stat().st_size for path in run.files.values())
    ctx.log_metrics(
        {
            "tokens_per_s": run.tokens_per_s,
            "bytes_written": run.bytes_written,
            "cache_bytes": shard_bytes,
            "layers_run": run.layers_run,
        }
    )
    ctx.run.set_tags({"activations.resumed_at_layer": run.start_layer or 0})
    ctx.run.log_artifact(ctx.out / "manifest.json")
    ctx.run.log_reference("activations", stage_dir("activations") / "layers")
    remove_path(work)


if __name__ == "__main__":
    main()
