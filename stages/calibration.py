"""DVC stage `calibration@<set>`: build one named calibration set of `calibration.sets`.

Writes `outputs/calibration/<set>/input_ids.safetensors` (`input_ids` int64 `[num_samples, seq_len]`)
and `manifest.json` (sources, dataset fingerprints, token count, seed), tokenised with the model's
tokenizer. One stage per set, so a change to one set reruns only that set's consumers.
"""

from __future__ import annotations

from pipeline.calibration import build_set, write_calibration_set
from pipeline.errors import PipelineError
from pipeline.models.loading import ModelManifest, load_tokenizer
from stages.common import StageContext, stage, stage_dir


@stage("calibration")
def main(ctx: StageContext) -> None:
    """Tokenise and pack the set named by the stage's item."""
    if ctx.item is None:
        raise PipelineError("usage: python -m stages.calibration <set> (dvc repro runs calibration@<set>)")
    p = ctx.params
    manifest = ModelManifest.load(stage_dir("model") / "manifest.json")
    tokenizer = load_tokenizer(manifest.path, trust_remote_code=p.runtime.trust_remote_code)
    input_ids, info = build_set(
        ctx.item,
        p.calibration.sets[ctx.item],
        tokenizer,
        seed=p.calibration.seed,
        corpus_dir=stage_dir("corpus") / "data",
        max_positions=manifest.max_position_embeddings,
    )
    info["model_fingerprint"] = manifest.fingerprint
    write_calibration_set(ctx.out, input_ids, info)
    ctx.log_metrics({"num_tokens": info["num_tokens"], "documents": sum(s["documents"] for s in info["sources"])})
    ctx.run.log_artifact(ctx.out / "manifest.json")
    ctx.run.set_tags({"calibration.fingerprint": info["fingerprint"]})


if __name__ == "__main__":
    main()
