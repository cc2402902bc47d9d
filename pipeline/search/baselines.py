"""Baseline expert selections (method.md §5): frequency (paper), random (paper, seeded) and REAP.

Each returns ``r`` sorted expert ids of one layer; ties go to the lower expert id.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.search.scoring import RoutingStats
from pipeline.search.strategies import LayerProblem, StrategyResult


def _top(scores: torch.Tensor, r: int) -> list[int]:
    """The ``r`` highest scores; equal scores ordered by expert id."""
    order = sorted(range(scores.numel()), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:r])


def frequency(stats: RoutingStats, r: int) -> list[int]:
    """The ``r`` experts the full model routes calibration tokens to most often."""
    return _top(stats.counts.double(), r)


def reap(stats: RoutingStats, r: int) -> list[int]:
    """The ``r`` experts with the highest REAP score (mean of ``w_j(x) ||E_j(x)||`` over routed tokens)."""
    return _top(stats.reap_scores(), r)


def random_experts(n: int, r: int, seed: int, layer: int) -> list[int]:
    """``r`` experts drawn uniformly, seeded by ``(seed, layer)``."""
    rng = np.random.default_rng([seed, layer])
    return sorted(int(e) for e in rng.choice(n, size=r, replace=False))


def frequency_layer(p: LayerProblem) -> StrategyResult:
    """:func:`frequency` on one layer, scored."""
    return p.single(frequency(p.stats, p.r))


def reap_layer(p: LayerProblem) -> StrategyResult:
    """:func:`reap` on one layer, scored."""
    return p.single(reap(p.stats, p.r))


def random_layer(p: LayerProblem) -> StrategyResult:
    """:func:`random_experts` on one layer, scored."""
    return p.single(random_experts(p.n, p.r, p.params.seed, p.layer))
