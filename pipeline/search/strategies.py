"""Search strategies over kept-expert sets (method.md §5): enumeration, greedy and beam search.

Every strategy minimises a loss given as ``fitness(kept [C, m]) -> [C]`` (ascending ids per row) and
returns a :class:`StrategyResult`. Ties are broken towards the lexicographically smallest set, so a
search is a deterministic function of its losses. The ``*_layer`` functions run a strategy on one
layer's :class:`LayerProblem`; :mod:`pipeline.search.registry` names them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pipeline.config import SearchParams
    from pipeline.search.incremental import LazyScorer
    from pipeline.search.scoring import LayerScorer, RoutingStats

#: ``fitness(kept [C, m]) -> losses [C]`` (float64).
Fitness = Callable[[torch.Tensor], torch.Tensor]
#: ``expand(parents) -> [(kept [m, m - 1], losses [m])]``: for each parent every set one expert smaller, scored.
Expand = Callable[[Sequence[Sequence[int]]], list[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class StrategyResult:
    """The chosen set, its loss, and every size-``r`` candidate the search scored."""

    kept: list[int]
    loss: float
    evaluated: int
    candidates: torch.Tensor = field(repr=False)  # [C, r] long: scored r-subsets
    losses: torch.Tensor = field(repr=False)  # [C] float64
    #: The best set found at each other size and its loss (``search.allocation: global``; else empty).
    by_size: dict[int, tuple[list[int], float]] = field(default_factory=dict, repr=False)


def best_of(kept: torch.Tensor, losses: torch.Tensor) -> int:
    """Row of the smallest loss; among equal losses the lexicographically smallest set."""
    ties = torch.nonzero(losses == losses.min()).view(-1).tolist()
    return min(ties, key=lambda i: kept[i].tolist())


@dataclass
class LayerProblem:
    """One layer's search: its scorer, expert count, search params and index; each set's loss computed once.

    ``progress`` is called with the number of sets each scoring call adds.
    """

    scorer: LayerScorer | LazyScorer
    n: int
    params: SearchParams
    layer: int
    known: dict[tuple[int, ...], float] = field(default_factory=dict, repr=False)
    progress: Callable[[int], None] | None = field(default=None, repr=False)

    @property
    def r(self) -> int:
        """Experts to keep."""
        return self.params.r

    @property
    def curve_down_to(self) -> int | None:
        """The smallest size whose best set the search also reports (``search.allocation: global``), else None."""
        if getattr(self.params, "allocation", "uniform") != "global":
            return None
        return self.scorer.k

    @property
    def stats(self) -> RoutingStats:
        """The full model's routing statistics (after a dense pass if no pass ran yet)."""
        self._ensure_pass()
        assert self.scorer.stats is not None
        return self.scorer.stats

    def _ensure_pass(self) -> None:
        if self.scorer.stats is None:
            self.scorer.prepare()

    def remember(self, kept: torch.Tensor, losses: torch.Tensor) -> None:
        """Record already scored sets."""
        self.known.update(zip(map(tuple, kept.tolist()), losses.tolist(), strict=True))

    def losses(self, kept: torch.Tensor) -> torch.Tensor:
        """Loss of each kept set ``[C, m]`` -> ``[C]`` float64 (the strategies' fitness)."""
        rows = [tuple(r) for r in kept.tolist()]
        todo = sorted({r for r in rows if r not in self.known})
        if todo:
            self._ensure_pass()
            todo_t = torch.tensor(todo, dtype=torch.long)
            self.remember(todo_t, self.scorer.losses(todo_t))
            if self.progress:
                self.progress(len(todo))
        return torch.tensor([self.known[r] for r in rows], dtype=torch.float64)

    @property
    def expand(self) -> Expand | None:
        """Incremental scoring of a parent's children when the scorer has it (:class:`LazyScorer`), else None."""
        return self._children if hasattr(self.scorer, "children") else None

    def _children(self, parents: Sequence[Sequence[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self._ensure_pass()
        out = []
        for kept, losses in self.scorer.children(parents):  # type: ignore[union-attr]
            rows = list(map(tuple, kept.tolist()))
            new = [i for i, row in enumerate(rows) if row not in self.known]
            self.remember(kept[new], losses[new])
            if self.progress:
                self.progress(len(new))
            out.append((kept, torch.tensor([self.known[r] for r in rows], dtype=torch.float64)))
        return out

    def single(self, kept: Sequence[int]) -> StrategyResult:
        """The result of a strategy that picks one set without search."""
        kept_t = torch.tensor([list(kept)], dtype=torch.long)
        loss_t = self.losses(kept_t)
        return StrategyResult(list(kept), float(loss_t[0]), 1, kept_t, loss_t)


def enumerate_all(kept: torch.Tensor, losses: torch.Tensor) -> StrategyResult:
    """Exhaustive search: the argmin over every scored ``r``-subset (given in lexicographic order)."""
    i = best_of(kept, losses)
    return StrategyResult(kept[i].tolist(), float(losses[i]), int(kept.shape[0]), kept.cpu(), losses.cpu())


def first_of_each(scored: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct sets of ``(kept [C_i, m], losses [C_i])`` pairs in lexicographic order, each with its first loss."""
    rows = torch.cat([kept for kept, _ in scored])
    losses = torch.cat([loss.double().cpu() for _, loss in scored])
    # Sets of one size in lexicographic order are their bit masks (lowest expert highest) descending:
    # stable sorts by 62-bit words, least significant first, keep each set's first occurrence first.
    bits = 62
    member = torch.zeros(rows.shape[0], -(-(int(rows.max()) + 1) // bits) * bits, dtype=torch.long)
    member.scatter_(1, rows, 1)
    words = (member.view(rows.shape[0], -1, bits) << torch.arange(bits - 1, -1, -1)).sum(2)
    order = torch.arange(rows.shape[0])
    for w in range(words.shape[1] - 1, -1, -1):
        order = order[torch.sort(-words[order, w], stable=True).indices]
    words = words[order]
    first = torch.ones(order.numel(), dtype=torch.bool)
    first[1:] = (words[1:] != words[:-1]).any(1)
    return rows[order[first]], losses[order[first]]


def beam_search(
    fitness: Fitness, n: int, r: int, width: int, expand: Expand | None = None, down_to: int | None = None
) -> StrategyResult:
    """Drop one expert at a time from all ``n``, keeping the ``width`` best sets of each size.

    ``width=1`` is greedy search. With ``expand``, each parent's children are scored together
    (incrementally, :meth:`LazyScorer.children`) and a set shared by two parents takes the loss from
    the first parent in order; otherwise ``fitness`` scores every set at most once. With ``down_to``
    (below ``r``) the search goes on to that size; the result is still the size-``r`` one, and
    ``by_size`` holds the best set of every size visited.
    """
    beams: list[tuple[int, ...]] = [tuple(range(n))]
    evaluated = 0
    last_kept = torch.empty(0, r, dtype=torch.long)
    last_losses = torch.empty(0, dtype=torch.float64)
    at_r: tuple[torch.Tensor, torch.Tensor, int] | None = None
    by_size: dict[int, tuple[list[int], float]] = {}
    for size in range(n - 1, min(r, down_to if down_to is not None else r) - 1, -1):
        if expand is None:
            children = sorted({tuple(e for e in parent if e != drop) for parent in beams for drop in parent})
            kept = torch.tensor(children, dtype=torch.long)
            losses = fitness(kept).double().cpu()
        else:
            kept, losses = first_of_each(expand(sorted(beams)))
        evaluated += kept.shape[0]
        # Rows are in lexicographic order: a stable sort orders by (loss, set).
        order = torch.sort(losses, stable=True).indices[:width]
        beams = [tuple(kept[i].tolist()) for i in order.tolist()]
        last_kept, last_losses = kept, losses
        if down_to is not None:
            best = best_of(kept, losses)
            by_size[size] = (kept[best].tolist(), float(losses[best]))
        if size == r:
            at_r = (kept, losses, evaluated)
    if at_r is not None:
        last_kept, last_losses, evaluated_at_r = at_r
    else:
        evaluated_at_r = evaluated
    i = best_of(last_kept, last_losses)
    by_size.pop(r, None)
    return StrategyResult(last_kept[i].tolist(), float(last_losses[i]), evaluated_at_r, last_kept, last_losses, by_size)


def greedy_search(
    fitness: Fitness, n: int, r: int, expand: Expand | None = None, down_to: int | None = None
) -> StrategyResult:
    """Drop, one at a time, the expert whose removal raises the loss least (beam width 1)."""
    return beam_search(fitness, n, r, width=1, expand=expand, down_to=down_to)


def enumerate_layer(p: LayerProblem) -> StrategyResult:
    """Every ``r``-subset, from one pass computing only the needed expert outputs.

    With ``search.allocation: global`` every other size from ``top_k`` to ``n - 1`` is enumerated
    too (one pass each, before the size-``r`` one, which the scorer is left prepared for).
    """
    by_size: dict[int, tuple[list[int], float]] = {}
    down_to = p.curve_down_to
    for size in range(down_to, p.n) if down_to is not None else ():
        if size == p.r:
            continue
        kept_s, losses_s = p.scorer.score_subsets(size)  # type: ignore[union-attr]
        if p.progress:
            p.progress(int(kept_s.shape[0]))
        best = best_of(kept_s, losses_s)
        by_size[size] = (kept_s[best].tolist(), float(losses_s[best]))
    kept, losses = p.scorer.score_subsets(p.r)  # type: ignore[union-attr]
    p.remember(kept, losses)
    if p.progress:
        p.progress(int(kept.shape[0]))
    result = enumerate_all(kept, losses)
    result.by_size = by_size
    return result


def greedy_layer(p: LayerProblem) -> StrategyResult:
    """:func:`greedy_search` on one layer."""
    return greedy_search(p.losses, p.n, p.r, p.expand, p.curve_down_to)


def beam_layer(p: LayerProblem) -> StrategyResult:
    """:func:`beam_search` of width ``search.beam_width`` on one layer."""
    return beam_search(p.losses, p.n, p.r, p.params.beam_width, p.expand, p.curve_down_to)
