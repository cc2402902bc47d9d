"""DVC stage ``corpus``: the offline multi-domain corpus and its held-out benchmark data.

Writes ``outputs/corpus/``: ``data/`` (a DatasetDict with train/validation/test), ``eval/`` (per
domain: multiple-choice items and perplexity documents from the test split, and the lm-eval task
YAMLs that read them, so ``eval/`` is an lm-eval include path), ``manifest.json``.
"""

from __future__ import annotations

from pipeline.corpus import (
    build_corpus,
    build_eval,
    corpus_manifest,
    corpus_metrics,
    write_corpus,
)
from pipeline.task_files import write_task_files
from stages.common import StageContext, stage, stage_dir


@stage("corpus")
def run(ctx: StageContext) -> None:
    """Build the corpus from the standard library and generators, then its eval files and task files."""
    p = ctx.params.corpus
    corpus = build_corpus(p)
    evals = build_eval(corpus, p.domains, p.eval, p.seed)
    manifest = corpus_manifest(corpus, evals, p)
    write_corpus(ctx.out, corpus, evals, manifest)
    # the YAMLs name their data relative to the repository root, where lm-eval and DVC run
    write_task_files(ctx.out / "eval", list(evals), stage_dir("corpus") / "eval")
    ctx.log_metrics(corpus_metrics(manifest))
    ctx.run.set_tags({"corpus.fingerprint": manifest["fingerprint"], "corpus.python": manifest["provenance"]["python"]})
    ctx.run.log_artifact(ctx.out / "manifest.json")
    for domain in p.domains:
        ctx.run.log_artifact(ctx.out / "eval" / f"{domain}_mc.jsonl", artifact_path="eval")


if __name__ == "__main__":
    run()
