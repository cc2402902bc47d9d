"""Paired difference between two benchmark variants (``other - base``), with the report's statistics.

The benchmark report compares every variant with ``original``; this compares any two of one run,
e.g. ``merged`` against ``pruned``, from the per-document scores the benchmark keeps
(``outputs/benchmark/results/<variant>.items.json``), with the same functions
(``pipeline.evaluate.stats``: paired bootstrap, McNemar's exact test for accuracies).

    .venv/bin/python bench/paired_variants.py outputs/benchmark/results pruned merged

``--gap-from original`` also prints, per perplexity task, the fraction of the ``original``-vs-``base``
gap that ``other`` closes (``pipeline.evaluate.stats.gap_closed``; e.g. ``pruned recovered``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.evaluate import stats  # noqa: E402
from pipeline.evaluate.lmeval import ItemScores  # noqa: E402

PERPLEXITY = ("bits_per_byte", "word_perplexity")


def _items(results: Path, variant: str) -> dict[str, ItemScores]:
    data = json.loads((results / f"{variant}.items.json").read_text())
    return {task: ItemScores.from_json(doc) for task, doc in data["tasks"].items()}


def _fmt(c: stats.Comparison, scale: float = 1.0, unit: str = "") -> str:
    iv = "[-]" if c.interval is None else f"[{c.interval[0] * scale:+.3f}, {c.interval[1] * scale:+.3f}]"
    p = "" if c.p_value is None else f", McNemar p {c.p_value:.2g}"
    return f"{c.difference * scale:+.3f}{unit} {iv}{p}: {c.verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("base")
    parser.add_argument("other")
    parser.add_argument("--gap-from", metavar="VARIANT", help="also the fraction of the VARIANT-vs-base gap other closes")
    args = parser.parse_args()
    base, other = _items(args.results, args.base), _items(args.results, args.other)
    reference = _items(args.results, args.gap_from) if args.gap_from else None
    pairs = []
    for task in sorted(base):
        a, b = base[task], other[task]
        if a.doc_ids != b.doc_ids:
            raise SystemExit(f"{task}: the two variants scored different documents")
        if a.loglikelihood is not None and b.loglikelihood is not None:
            for metric in PERPLEXITY:
                c = stats.compare_perplexity(metric, a.loglikelihood, b.loglikelihood, a.counts(metric) or [])
                print(f"{args.other} - {args.base} {task} {metric}: {_fmt(c)}")
                if reference is not None and reference[task].doc_ids == a.doc_ids:
                    point, iv = stats.gap_closed(metric, reference[task].loglikelihood, a.loglikelihood, b.loglikelihood,
                                                 a.counts(metric) or [])
                    shown = "[-]" if iv is None else f"[{iv[0]:.2f}, {iv[1]:.2f}]"
                    print(f"{args.other} closes of the {args.gap_from}-vs-{args.base} gap {task} {metric}: {point:.2f} {shown}")
        for metric, scores in a.scores.items():
            if metric.endswith("_stderr") or metric not in b.scores:
                continue
            c = stats.compare_accuracy(scores, b.scores[metric])
            print(f"{args.other} - {args.base} {task} {metric}: {_fmt(c, 100, ' pp')}")
            if metric == "acc":
                pairs.append((scores, b.scores[metric]))
    if pairs:
        print(f"{args.other} - {args.base} average acc: {_fmt(stats.compare_average_accuracy(pairs), 100, ' pp')}")


if __name__ == "__main__":
    main()
