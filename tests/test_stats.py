"""Benchmark statistics: intervals, paired comparisons, McNemar, verdicts, speed-up (known cases)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
from scipy.stats import binomtest

from pipeline.evaluate import stats


def _scores(n: int, p: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_wilson_interval_known_case_and_bounds():
    low, high = stats.accuracy_interval([1.0] * 8 + [0.0] * 2)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # Wilson 95% for 8/10
    assert stats.accuracy_interval([1.0, 1.0, 1.0])[1] == pytest.approx(1.0)  # clipped, not a point at 100%
    assert stats.accuracy_interval([1.0, 1.0, 1.0])[0] < 1.0
    assert stats.accuracy_interval([]) is None


def test_corpus_metric_matches_lm_eval_aggregations():
    ll, words, nbytes = np.array([-40.0, -75.5, -12.25]), np.array([10, 20, 3]), np.array([50, 90, 17])
    assert stats.corpus_metric("word_perplexity", ll, words) == pytest.approx(
        weighted_perplexity(list(zip(ll, words, strict=True)))
    )
    assert stats.corpus_metric("bits_per_byte", ll, nbytes) == pytest.approx(
        bits_per_byte(list(zip(ll, nbytes, strict=True)))
    )


def test_intervals_cover_the_point_and_are_deterministic():
    x = _scores(200, 0.6, 0)
    low, high = stats.accuracy_interval(x)
    assert low < x.mean() < high
    rng = np.random.default_rng(3)
    ll, n = -rng.random(40) * 100, rng.integers(20, 40, 40)
    point = float(stats.corpus_metric("word_perplexity", ll, n))
    ci = stats.perplexity_interval("word_perplexity", ll, n)
    assert ci[0] < point < ci[1]
    assert stats.perplexity_interval("word_perplexity", ll, n) == ci  # seeded
    assert stats.perplexity_interval("word_perplexity", ll[:1], n[:1]) is None  # one document: no interval


def test_identical_variants_differ_by_zero_within_noise():
    a = _scores(300, 0.5, 1)
    c = stats.compare_accuracy(a, a.copy())
    assert c.difference == 0.0 and c.interval == (0.0, 0.0) and c.verdict == stats.WITHIN_NOISE and c.p_value == 1.0
    ll, n = -np.arange(1.0, 21.0) * 10, np.full(20, 7)
    c = stats.compare_perplexity("bits_per_byte", ll, ll.copy(), n)
    assert c.difference == 0.0 and c.verdict == stats.WITHIN_NOISE
    avg = stats.compare_average_accuracy([(a, a.copy()), (a[:50], a[:50].copy())])
    assert avg.difference == 0.0 and avg.verdict == stats.WITHIN_NOISE


def test_clearly_better_and_worse_variants():
    a = _scores(500, 0.5, 2)
    better = np.where(_scores(500, 0.3, 4) == 1, 1.0, a)  # right on ~30% of the items it got wrong
    c = stats.compare_accuracy(a, better)
    assert c.verdict == stats.BETTER and c.interval[0] > 0 and c.interval[0] < c.difference < c.interval[1]
    assert stats.compare_accuracy(better, a).verdict == stats.WORSE
    ll, n = -np.linspace(50, 150, 30), np.full(30, 20)
    assert stats.compare_perplexity("word_perplexity", ll, ll * 1.1, n).verdict == stats.WORSE  # lower is better
    assert stats.compare_perplexity("word_perplexity", ll, ll * 0.9, n).verdict == stats.BETTER
    small = stats.compare_accuracy([1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0])
    assert small.verdict == stats.WITHIN_NOISE  # one item gained of four is noise


def test_mcnemar_matches_scipy_on_a_hand_case():
    base = [1, 1, 1, 1, 1, 1, 0, 1, 0, 0]
    other = [0, 0, 0, 0, 0, 0, 1, 1, 0, 0]  # 1 gained, 6 lost, 3 concordant
    p = stats.mcnemar_exact(base, other)
    assert p == pytest.approx(binomtest(1, 7, 0.5).pvalue) and p == pytest.approx(16 / 128)
    assert stats.compare_accuracy(base, other).p_value == pytest.approx(p)
    assert stats.mcnemar_exact(base, base) == 1.0


def test_verdict_rule():
    assert stats.verdict((0.01, 0.2), higher_is_better=True) == stats.BETTER
    assert stats.verdict((0.01, 0.2), higher_is_better=False) == stats.WORSE
    assert stats.verdict((-0.3, -0.01), higher_is_better=False) == stats.BETTER
    assert stats.verdict((0.0, 0.2), higher_is_better=True) == stats.WITHIN_NOISE  # touching 0 is not excluding it
    assert stats.verdict(None, higher_is_better=True) == stats.WITHIN_NOISE


def test_speed_spread_and_speedup_verdicts():
    s = stats.spread([10.0, 12.0, 11.0, 30.0, float("nan")])
    assert (s.median, s.min, s.max, s.q1, s.q3, s.rounds) == (11.5, 10.0, 30.0, 10.75, 16.5, 4)
    base = [100.0, 90.0, 110.0, 95.0, 105.0, 100.0]
    noisy = stats.speedup(base, [104.0, 86.0, 112.0, 99.0, 100.0, 103.0])  # ratios on both sides of 1
    assert noisy.verdict == stats.WITHIN_NOISE and noisy.interval[0] <= 1.0 <= noisy.interval[1]
    fast = stats.speedup(base, [b * f for b, f in zip(base, [1.3, 1.28, 1.35, 1.31, 1.29, 1.33], strict=True)])
    assert fast.verdict == stats.FASTER and fast.ratio == pytest.approx(1.305) and fast.interval[0] > 1.0
    assert stats.speedup(base, [b * 0.7 for b in base]).verdict == stats.SLOWER
    few = stats.speedup(base[:5], [b * 1.3 for b in base[:5]])  # 5 rounds all faster: 2/2**5 > 5% by chance
    assert few.interval[0] > 1.0 and few.verdict == stats.WITHIN_NOISE
    one = stats.speedup([100.0], [140.0])
    assert one.ratio == pytest.approx(1.4) and one.interval is None and one.verdict == stats.WITHIN_NOISE
    assert stats.speedup([float("nan")], [1.0]) is None
    assert math.isclose(stats.speedup(base, base).ratio, 1.0)


def test_gap_closed_is_the_fraction_of_the_pruning_gap_recovered() -> None:
    rng = np.random.default_rng(0)
    n = rng.integers(50, 200, size=40).astype(float)
    original = -n * rng.uniform(0.9, 1.1, size=40)  # about 1 nat per unit
    pruned = original * 1.2
    halfway = (original + pruned) / 2
    point, interval = stats.gap_closed("bits_per_byte", original, pruned, halfway, n)
    assert point == pytest.approx(0.5) and interval is not None and interval[0] <= 0.5 <= interval[1]
    assert stats.gap_closed("bits_per_byte", original, pruned, original, n)[0] == pytest.approx(1.0)
    assert stats.gap_closed("bits_per_byte", original, pruned, pruned * 1.1, n)[0] < 0  # worse than pruned
    point, interval = stats.gap_closed("word_perplexity", original, pruned, halfway, n)
    assert 0 < point < 1 and interval[0] < point < interval[1]
