"""DVC stage ``model``: the MoE the pipeline prunes, and its manifest.

``model.source: embedded`` trains a small MoE and its tokenizer on the corpus (``checkpoint/`` is a
standard HF checkpoint, ``plots/`` holds per-domain perplexity and routing histograms). A hub id
or a local directory is used in place (nothing is downloaded or trained); ``checkpoint/`` then
only holds a README pointing at it. Either way ``manifest.json`` tells downstream stages where the
checkpoint is and its fingerprint.
"""

from __future__ import annotations

from pipeline.config import EMBEDDED
from pipeline.io import atomic_write_text
from pipeline.runtime import resolve_device
from pipeline.train import adopt_source_model, embedded_manifest, train_embedded
from stages.common import StageContext, stage, stage_dir


@stage("model")
def run(ctx: StageContext) -> None:
    """Train the embedded model, or adopt a real one; write the manifest."""
    p = ctx.params.model
    trust_remote_code = ctx.params.runtime.trust_remote_code  # a real model's own code (unused when embedded)
    if p.source == EMBEDDED:
        result = train_embedded(
            stage_dir("corpus") / "data",
            ctx.out,
            p.embedded,
            resolve_device(ctx.params.runtime.device),
            on_step=lambda step, metrics: ctx.log_metrics(metrics, step=step),
        )
        manifest = embedded_manifest(result.checkpoint, (stage_dir("model") / "checkpoint").as_posix())
        ctx.log_metrics(result.metrics)
        for plot in result.plots:
            ctx.run.log_artifact(plot, artifact_path="plots")
    else:
        manifest = adopt_source_model(
            p.source, p.revision, ctx.out / "checkpoint", trust_remote_code
        )
        atomic_write_text(ctx.out / "plots" / "README.md", "No plots: the model was not trained by the pipeline.\n")
    ctx.log_metrics(
        {
            "num_experts": manifest.num_experts,
            "top_k": manifest.top_k,
            "moe_layers": len(manifest.moe_layers),
            "num_hidden_layers": manifest.num_hidden_layers,
        }
    )
    manifest.save(ctx.out / "manifest.json")
    ctx.run.set_tags({"model.fingerprint": manifest.fingerprint, "model.type": manifest.model_type})
    ctx.run.log_reference("checkpoint", manifest.path, manifest.fingerprint)
    ctx.run.log_artifact(ctx.out / "manifest.json")


if __name__ == "__main__":
    run()
