"""Search strategies over kept-expert sets (method.md §5): enumeration, greedy and beam search.

Every strategy minimises a loss given as ``fitness(kept [C, m]) -> [C]`` (ascending ids per row) and
returns a :class:`StrategyResult`. Ties are broken towards the lexicographically smallest set, so a
search is a deterministic function of its losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeline.errors import PipelineError

#: ``fitness(kept [C, m]) -> losses [C]`` (float64).
Fitness = Callable[[torch.Tensor], torch.Tensor]
SEARCHES = ("enumerate", "greedy", "beam", "evolutionary")


@dataclass
class StrategyResult:
    """The chosen set, its loss, and every size-``r`` candidate the search scored."""

    kept: list[int]
    loss: float
    evaluated: int
    candidates: torch.Tensor = field(repr=False)  # [C, r] long: scored r-subsets
    losses: torch.Tensor = field(repr=False)  # [C] float64


def best_of(kept: torch.Tensor, losses: torch.Tensor) -> int:
    """Row of the smallest loss; among equal losses the lexicographically smallest set."""
    ties = torch.nonzero(losses == losses.min()).view(-1).tolist()
    return min(ties, key=lambda i: kept[i].tolist())


def validate_r(r: int, n: int, top_k: int, key: str = "search.r") -> None:
    """Raise unless ``top_k <= r < n`` (a search must drop at least one expert)."""
    if r <= 0:
        raise PipelineError(f"{key}: must be a positive number of experts to keep (got {r})")
    if r >= n:
        raise PipelineError(f"{key}: must be below the model's {n} experts per layer (got {r})")
    if r < top_k:
        raise PipelineError(f"{key}: must be at least the model's top_k={top_k} (got {r})")


def resolve(strategy: str, n: int, r: int, enumerate_budget: int) -> str:
    """``auto`` -> ``enumerate`` when ``C(n, r) <= enumerate_budget``, else ``beam``; others unchanged."""
    if strategy != "auto":
        return strategy
    return "enumerate" if math.comb(n, r) <= enumerate_budget else "beam"


def planned_candidates(strategy: str, n: int, r: int, *, beam_width: int = 1, budget: int = 0) -> int:
    """An upper bound on the sets a strategy scores per layer (before it runs)."""
    if strategy == "enumerate":
        return math.comb(n, r)
    if strategy in ("greedy", "beam"):
        width = 1 if strategy == "greedy" else beam_width
        total, beams = 0, 1
        for size in range(n - 1, r - 1, -1):
            level = min(beams * (size + 1), math.comb(n, size))
            total += level
            beams = min(width, level)
        return total
    if strategy == "evolutionary":
        return min(budget, math.comb(n, r))
    return 1


def enumerate_all(kept: torch.Tensor, losses: torch.Tensor) -> StrategyResult:
    """Exhaustive search: the argmin over every scored ``r``-subset (given in lexicographic order)."""
    i = best_of(kept, losses)
    return StrategyResult(kept[i].tolist(), float(losses[i]), int(kept.shape[0]), kept.cpu(), losses.cpu())


def beam_search(fitness: Fitness, n: int, r: int, width: int) -> StrategyResult:
    """Drop one expert at a time from all ``n``, keeping the ``width`` best sets of each size.

    ``width=1`` is greedy search. Every set is scored at most once.
    """
    beams: list[tuple[int, ...]] = [tuple(range(n))]
    evaluated = 0
    last_kept = torch.empty(0, r, dtype=torch.long)
    last_losses = torch.empty(0, dtype=torch.float64)
    for _size in range(n - 1, r - 1, -1):
        children = sorted({tuple(e for e in parent if e != drop) for parent in beams for drop in parent})
        kept = torch.tensor(children, dtype=torch.long)
        losses = fitness(kept).double().cpu()
        evaluated += len(children)
        order = sorted(range(len(children)), key=lambda i: (float(losses[i]), children[i]))
        beams = [children[i] for i in order[:width]]
        last_kept, last_losses = kept, losses
    i = best_of(last_kept, last_losses)
    return StrategyResult(last_kept[i].tolist(), float(last_losses[i]), evaluated, last_kept, last_losses)


def greedy_search(fitness: Fitness, n: int, r: int) -> StrategyResult:
    """Drop, one at a time, the expert whose removal raises the loss least (beam width 1)."""
    return beam_search(fitness, n, r, width=1)
