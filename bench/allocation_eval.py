"""Downstream comparison of global vs uniform budgets: lm-eval on checkpoints written by bench/allocation.py.

Each checkpoint is loaded with ``pipeline.models.loading.load_model`` (per-layer counts included)
and evaluated in memory through lm-eval's ``hf`` backend on the project's embedded tasks (every
held-out document); ``global - uniform`` per task with the benchmark's statistics (paired
bootstrap for perplexity, McNemar and a paired interval for accuracy; ``pipeline.evaluate.stats``).

    .venv/bin/python bench/allocation_eval.py /tmp/budsnap /tmp/alloc --r 6 4 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from pipeline.evaluate import stats  # noqa: E402
from pipeline.evaluate.lmeval import ItemScores, evaluate_model  # noqa: E402
from pipeline.evaluate.tasks import select_tasks  # noqa: E402
from pipeline.models.loading import load_model, load_tokenizer  # noqa: E402


def _iv(interval, scale: float = 1.0) -> str:
    return "[-]" if interval is None else f"[{interval[0] * scale:.3f}, {interval[1] * scale:.3f}]"


def _diff(c: stats.Comparison, scale: float = 1.0) -> str:
    iv = "[-]" if c.interval is None else f"[{c.interval[0] * scale:+.3f}, {c.interval[1] * scale:+.3f}]"
    return f"{c.difference * scale:+.3f} {iv} ({c.verdict})"


def items(project: Path, checkpoint: Path, cache: Path) -> dict[str, ItemScores]:
    if cache.is_file():
        return {k: ItemScores.from_json(v) for k, v in json.loads(cache.read_text()).items()}
    model = load_model(checkpoint)
    with select_tasks(["embedded"], project / "outputs/corpus/eval") as selection:
        evaluation = evaluate_model(model, load_tokenizer(checkpoint), selection, batch_size=16)
    cache.write_text(json.dumps({k: v.to_json() for k, v in evaluation.items.items()}))
    return evaluation.items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("exports", type=Path)
    parser.add_argument("--r", type=int, nargs="+", default=[6, 4, 3])
    args = parser.parse_args()
    print("| r | task | metric | uniform [95% CI] | global [95% CI] | global - uniform [95% CI] |")
    print("|---:|---|---|---|---|---|")
    for r in args.r:
        runs = {}
        for name in ("uniform", "global"):
            folder = args.exports / f"r{r}_{name}"
            runs[name] = items(args.project, folder / "model", folder / "items.json")
        base, other = runs["uniform"], runs["global"]
        for task in sorted(base):
            a, b = base[task], other[task]
            assert a.doc_ids == b.doc_ids, task
            if a.loglikelihood is not None:
                metric = "bits_per_byte"
                counts = a.counts(metric) or []
                ia = stats.perplexity_interval(metric, a.loglikelihood, counts)
                ib = stats.perplexity_interval(metric, b.loglikelihood, counts)
                c = stats.compare_perplexity(metric, a.loglikelihood, b.loglikelihood, counts)
                va = float(stats.corpus_metric(metric, np.asarray(a.loglikelihood), np.asarray(counts)))
                vb = float(stats.corpus_metric(metric, np.asarray(b.loglikelihood), np.asarray(counts)))
                print(f"| {r} | {task} | {metric} | {va:.4f} {_iv(ia)} | {vb:.4f} {_iv(ib)} | {_diff(c)} |")
            if "acc" in a.scores:
                sa, sb = a.scores["acc"], b.scores["acc"]
                c = stats.compare_accuracy(sa, sb)
                print(f"| {r} | {task} | acc (%) | {100 * sum(sa) / len(sa):.1f} {_iv(stats.accuracy_interval(sa), 100)} | "
                      f"{100 * sum(sb) / len(sb):.1f} {_iv(stats.accuracy_interval(sb), 100)} | {_diff(c, 100)} |")


if __name__ == "__main__":
    main()
