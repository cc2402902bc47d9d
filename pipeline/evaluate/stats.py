"""95% intervals, paired comparisons and verdicts for the benchmark report (scipy, seeded).

- an accuracy's interval: Wilson score interval (``scipy.stats.binomtest(...).proportion_ci``) of
  its per-item 0/1 scores; it stays in [0, 1] and does not shrink to a point at 0% or 100%;
- a perplexity's / bits-per-byte interval: percentile bootstrap over documents of the corpus-level
  metric (``scipy.stats.bootstrap``, documents resampled with their token counts);
- a variant's difference from the original: paired percentile bootstrap over items (accuracy) or
  documents (perplexity), plus McNemar's exact test on the discordant items for accuracy;
- the average accuracy over tasks: a bootstrap resampling items within each task (stratified);
- speed: median and spread of tokens/s over the interleaved rounds; the speed-up is the median of
  the per-round ratios with a bootstrap interval over rounds (a verdict needs :data:`MIN_ROUNDS`).

A verdict is ``better`` / ``worse`` (``faster`` / ``slower`` for speed) only when the 95% interval
excludes no change (0 for a difference, 1 for a speed ratio), otherwise ``within noise``.
Every bootstrap uses :data:`SEED`, so the same inputs give the same intervals.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

#: Confidence level of every interval.
CONFIDENCE = 0.95
#: Bootstrap resamples per interval.
RESAMPLES = 2_000
#: Seed of every bootstrap.
SEED = 0
#: Fewest timed rounds for a speed verdict: a bootstrap interval of a median over n rounds excludes
#: 1 once all n per-round ratios lie on one side of 1, which chance alone does with probability
#: 2 / 2**n (6.25% at 5 rounds, 3.1% at 6), so below 6 rounds no verdict reaches 95% confidence.
MIN_ROUNDS = 6
#: Resamples drawn at once (bounds memory on tasks with many items).
_BATCH = 500

BETTER, WORSE, WITHIN_NOISE = "better", "worse", "within noise"
FASTER, SLOWER = "faster", "slower"

#: How the intervals are computed, for the report and metrics.json.
METHOD = {
    "confidence": CONFIDENCE,
    "accuracy_interval": "Wilson score interval of the per-item scores",
    "perplexity_interval": "percentile bootstrap over documents of the corpus-level metric",
    "difference_interval": "paired percentile bootstrap over items (accuracy) or documents (perplexity)",
    "accuracy_test": "McNemar's exact test (binomial test on discordant items)",
    "average_accuracy_interval": "bootstrap resampling items within each task",
    "speedup_interval": "percentile bootstrap over rounds of the median per-round tokens/s ratio",
    "speedup_min_rounds": MIN_ROUNDS,
    "bootstrap_resamples": RESAMPLES,
    "seed": SEED,
}

Interval = tuple[float, float]
Statistic = Callable[..., np.ndarray]


def _bootstrap(data: Sequence[np.ndarray], statistic: Statistic, *, paired: bool) -> Interval | None:
    """Percentile bootstrap interval of ``statistic(*data, axis=-1)``; None with fewer than two observations."""
    arrays = [np.asarray(d, dtype=np.float64) for d in data]
    if not arrays or any(a.size < 2 for a in arrays):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate data (e.g. identical variants) is a valid, zero-width case
        res = stats.bootstrap(
            arrays,
            statistic,
            n_resamples=RESAMPLES,
            batch=_BATCH,
            vectorized=True,
            paired=paired,
            axis=-1,
            confidence_level=CONFIDENCE,
            method="percentile",
            rng=np.random.default_rng(SEED),
        )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    return (low, high)


def _is_binary(values: np.ndarray) -> bool:
    return bool(np.all((values == 0) | (values == 1)))


def accuracy_interval(values: Sequence[float]) -> Interval | None:
    """95% interval of the mean of per-item scores: Wilson for 0/1 scores, else a bootstrap of the mean."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None
    if _is_binary(x):
        ci = stats.binomtest(int(x.sum()), int(x.size)).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
        return (float(ci.low), float(ci.high))
    return _bootstrap([x], np.mean, paired=False)


def corpus_metric(metric: str, loglikelihood: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """lm-eval's corpus-level perplexity metric from per-document log-likelihoods and word/byte counts:
    ``word_perplexity`` / ``byte_perplexity`` = exp(-sum ll / sum count), ``bits_per_byte`` = -sum ll / sum bytes / ln 2."""
    per_unit = -np.sum(loglikelihood, axis=axis) / np.sum(counts, axis=axis)
    if metric == "bits_per_byte":
        return per_unit / math.log(2)
    if metric in ("word_perplexity", "byte_perplexity"):
        return np.exp(per_unit)
    raise ValueError(f"unknown perplexity metric {metric!r}")


def perplexity_interval(metric: str, loglikelihood: Sequence[float], counts: Sequence[float]) -> Interval | None:
    """95% interval of a corpus-level perplexity metric, documents resampled with their counts."""

    def statistic(ll: np.ndarray, n: np.ndarray, axis: int = -1) -> np.ndarray:
        return corpus_metric(metric, ll, n, axis)

    return _bootstrap([np.asarray(loglikelihood), np.asarray(counts)], statistic, paired=True)


def mean_of_means_interval(groups: Sequence[Sequence[float]]) -> Interval | None:
    """95% interval of the unweighted mean of the groups' means (items resampled within each group)."""

    def statistic(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean([np.mean(s, axis=axis) for s in samples], axis=0)

    return _bootstrap([np.asarray(g) for g in groups], statistic, paired=False)


def verdict(interval: Interval | None, higher_is_better: bool, null: float = 0.0) -> str:
    """``better`` / ``worse`` when ``interval`` excludes ``null`` (direction by ``higher_is_better``), else ``within noise``."""
    if interval is None or interval[0] <= null <= interval[1]:
        return WITHIN_NOISE
    above = interval[0] > null
    return BETTER if above == higher_is_better else WORSE


@dataclass(frozen=True)
class Comparison:
    """A variant minus the original: point difference, its 95% interval, a test's p-value, the verdict."""

    difference: float
    interval: Interval | None
    verdict: str
    n: int
    p_value: float | None = None


def mcnemar_exact(base: Sequence[float], other: Sequence[float]) -> float:
    """Two-sided p-value of McNemar's exact test on paired 0/1 scores (1.0 without discordant items)."""
    a, b = np.asarray(base) > 0.5, np.asarray(other) > 0.5
    gained, lost = int(np.sum(~a & b)), int(np.sum(a & ~b))
    if gained + lost == 0:
        return 1.0
    return float(stats.binomtest(gained, gained + lost, 0.5).pvalue)


def compare_accuracy(base: Sequence[float], other: Sequence[float]) -> Comparison:
    """Paired difference of mean per-item scores (other - base): bootstrap interval over items and,
    for 0/1 scores, McNemar's exact p-value."""
    a, b = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length ({a.size} vs {b.size})")
    diff = b - a
    interval = _bootstrap([diff], np.mean, paired=False)
    p = mcnemar_exact(a, b) if _is_binary(a) and _is_binary(b) else None
    return Comparison(float(diff.mean()) if diff.size else math.nan, interval, verdict(interval, True), int(a.size), p)


def compare_average_accuracy(pairs: Sequence[tuple[Sequence[float], Sequence[float]]]) -> Comparison:
    """Difference of the average over tasks of the mean score (other - base), items resampled
    pairwise within each task; ``pairs`` holds per task (base scores, other scores)."""
    diffs = [np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64) for a, b in pairs]
    point = float(np.mean([d.mean() for d in diffs])) if diffs else math.nan
    interval = mean_of_means_interval(diffs)
    return Comparison(point, interval, verdict(interval, True), sum(d.size for d in diffs))


def compare_perplexity(
    metric: str, base_ll: Sequence[float], other_ll: Sequence[float], counts: Sequence[float]
) -> Comparison:
    """Paired difference of a corpus-level perplexity metric (other - base), documents resampled
    together; lower is better."""
    a, b, n = (np.asarray(x, dtype=np.float64) for x in (base_ll, other_ll, counts))

    def statistic(x: np.ndarray, y: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
        return corpus_metric(metric, y, c, axis) - corpus_metric(metric, x, c, axis)

    point = float(statistic(a, b, n))
    interval = _bootstrap([a, b, n], statistic, paired=True)
    return Comparison(point, interval, verdict(interval, False), int(a.size))


def gap_closed(
    metric: str,
    original_ll: Sequence[float],
    pruned_ll: Sequence[float],
    recovered_ll: Sequence[float],
    counts: Sequence[float],
) -> tuple[float, Interval | None]:
    """Fraction of the original-vs-pruned gap of a corpus-level perplexity metric that recovery closes,
    ``(m_pruned - m_recovered) / (m_pruned - m_original)`` (1: back to the original, 0: no change, < 0:
    worse), with a paired bootstrap interval over documents (all three models on the same documents)."""
    o, p, r, n = (np.asarray(x, dtype=np.float64) for x in (original_ll, pruned_ll, recovered_ll, counts))

    def statistic(x: np.ndarray, y: np.ndarray, z: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
        base, pruned = corpus_metric(metric, x, c, axis), corpus_metric(metric, y, c, axis)
        return (pruned - corpus_metric(metric, z, c, axis)) / (pruned - base)

    with np.errstate(divide="ignore", invalid="ignore"):
        point = float(statistic(o, p, r, n))
        return point, _bootstrap([o, p, r, n], statistic, paired=True)


@dataclass(frozen=True)
class Spread:
    """Median, range and quartiles of one variant's tokens/s over the timed rounds."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    rounds: int


def spread(runs: Sequence[float]) -> Spread | None:
    """Median, min-max and interquartile range of ``runs`` (non-finite values left out); None if empty."""
    x = np.asarray([r for r in runs if r is not None and math.isfinite(r)], dtype=np.float64)
    if x.size == 0:
        return None
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return Spread(float(med), float(x.min()), float(x.max()), float(q1), float(q3), int(x.size))


@dataclass(frozen=True)
class Speedup:
    """Median of the per-round tokens/s ratios (variant / original), its 95% interval and the verdict."""

    ratio: float
    interval: Interval | None
    verdict: str
    rounds: int


def speedup(base_runs: Sequence[float], runs: Sequence[float]) -> Speedup | None:
    """Speed-up from rounds timed side by side (round i of both lists ran in the same round);
    rounds where either value is not finite are left out. The verdict stays ``within noise`` with
    fewer than :data:`MIN_ROUNDS` rounds. None without any usable round."""
    if len(base_runs) != len(runs):
        raise ValueError(f"speed rounds differ in number ({len(base_runs)} vs {len(runs)})")
    ratios = np.asarray(
        [r / b for b, r in zip(base_runs, runs, strict=True) if math.isfinite(b) and math.isfinite(r) and b > 0],
        dtype=np.float64,
    )
    if ratios.size == 0:
        return None
    interval = _bootstrap([ratios], np.median, paired=False)
    if interval is None or interval[0] <= 1.0 <= interval[1] or ratios.size < MIN_ROUNDS:
        word = WITHIN_NOISE
    else:
        word = FASTER if interval[0] > 1.0 else SLOWER
    return Speedup(float(np.median(ratios)), interval, word, int(ratios.size))
