"""DVC stage `calibration`: build every named calibration set of `calibration.sets`.

Writes `outputs/calibration/<set>.safetensors` (`input_ids` int64 `[num_samples, seq_len]`) and
`<set>.json` (sources, dataset fingerprints, token count, seed) per set, tokenised with the model's
tokenizer.
"""

from __future__ import annotations

from pipeline.calibration import build_calibration_sets
from pipeline.models.loading import ModelManifest, load_tokenizer
from stages.common import StageContext, stage, stage_dir


@stage("calibration", sections=("calibration",), upstream=("corpus", "model"))
def main(ctx: StageContext) -> None:
    """Tokenise and pack the calibration sets."""
    manifest = ModelManifest.load(stage_dir("model") / "manifest.json")
    tokenizer = load_tokenizer(manifest.path, trust_remote_code=ctx.params.runtime.trust_remote_code)
    sets = build_calibration_sets(
        ctx.params.calibration,
        tokenizer,
        ctx.out,
        corpus_dir=stage_dir("corpus") / "data",
        max_positions=manifest.max_position_embeddings,
        model_fingerprint=manifest.fingerprint,
    )
    for name, info in sets.items():
        ctx.log_metrics({f"{name}.num_tokens": info["num_tokens"], f"{name}.documents": sum(s["documents"] for s in info["sources"])})
        ctx.run.log_artifact(ctx.out / f"{name}.json", artifact_path="calibration")
    ctx.run.set_tags({f"calibration.{name}.fingerprint": info["fingerprint"] for name, info in sets.items()})


if __name__ == "__main__":
    main()
