"""Stage export: remove the experts the search dropped and save a standard HF checkpoint.

Reads outputs/model/manifest.json, outputs/search/selection.json and outputs/activations (to check
that the exported blocks compute the search's Z_hat(S), and to merge); writes outputs/export/model/
and outputs/export/merged/ (the pruned model with the dropped experts merged in, under
``export.merge``; else only a README saying so).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.export import Selection, export_pruned, validate_selection
from pipeline.models import get_adapter
from pipeline.models.loading import ModelManifest, checkpoint_fingerprint, load_config, load_model, load_tokenizer
from pipeline.runtime import DTYPES, resolve_device
from stages.common import StageContext, stage, stage_dir


#: outputs/export/merged/README.md when nothing is merged (the folder is a declared output either way).
NO_MERGE = "# No merged checkpoint\n\n`export.merge` is `none`; set it (docs/merging.md) to write one here.\n"


@stage("export")
def main(ctx: StageContext) -> None:
    p = ctx.params
    manifest = ModelManifest.load(stage_dir("model") / "manifest.json")
    selection = Selection.load(stage_dir("search") / "selection.json")
    validate_selection(
        selection,
        moe_layers=manifest.moe_layers,
        num_experts=manifest.num_experts,
        top_k=manifest.top_k,
        fingerprint=manifest.fingerprint,
    )
    checkpoint = Path(manifest.path)
    if checkpoint_fingerprint(checkpoint) != manifest.fingerprint:
        raise PipelineError(f"{checkpoint}: the checkpoint changed since the model stage ran (rerun: dvc repro model)")
    from pipeline.activations import ActivationCache

    cache = ActivationCache(stage_dir("activations"), manifest.fingerprint)
    device = resolve_device(p.runtime.device)
    dtype_name = manifest.torch_dtype if p.export.dtype == "auto" else p.export.dtype
    dtype = DTYPES.get(dtype_name or "float32", DTYPES["float32"])
    trust = p.runtime.trust_remote_code
    adapter = get_adapter(load_config(checkpoint, trust))
    model = load_model(checkpoint, dtype=dtype, device="cpu", trust_remote_code=trust, offload=p.runtime.offload)
    report = export_pruned(
        model,
        adapter,
        selection,
        ctx.out / "model",
        tokenizer=load_tokenizer(checkpoint, trust),
        source=manifest.source,
        source_fingerprint=manifest.fingerprint,
        max_shard_size=p.export.max_shard_size,
        inputs=cache.load,
        device=device,
        merge=p.export.merge,
        merged_dir=ctx.out / "merged",
        top_k=p.export.top_k,
        loss_batch_sequences=selection.loss_batch_size,
    )
    if p.export.merge == "none":
        (ctx.out / "merged").mkdir()
        (ctx.out / "merged" / "README.md").write_text(NO_MERGE, encoding="utf-8")
    ctx.log_metrics(report.metrics())
    ctx.run.log_artifact(ctx.out / "model" / "README.md")
    ctx.run.log_artifact(ctx.out / "model" / "config.json")
    ctx.run.log_reference("model", stage_dir("export") / "model")
    ctx.run.set_tags(
        {
            "export.selection_sha256": selection.sha256,
            "export.r": str(selection.r),
            "export.merge": p.export.merge,
            "export.top_k": str(p.export.top_k),
        }
    )
    if p.export.merge != "none":
        ctx.run.log_artifact(ctx.out / "merged" / "README.md", "merged")
        ctx.run.log_reference("merged", stage_dir("export") / "merged")


if __name__ == "__main__":
    main()
