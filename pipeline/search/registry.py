"""Search strategies by name: each one's search function, candidate-count estimate and docs row.

The one table of ``search.strategy`` / ``search.baselines`` values: params validation, the search
driver, its cost estimate and docs/search.md read it. Torch-free (functions are imported on use),
so the params schema can import it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.config import SearchParams

#: ``search.strategy`` value resolved per layer by :func:`resolve`.
AUTO = "auto"


def _enumerated(n: int, r: int, _params: SearchParams) -> int:
    return math.comb(n, r)


def _dropping(n: int, r: int, width: int) -> int:
    total, beams = 0, 1
    for size in range(n - 1, r - 1, -1):
        level = min(beams * (size + 1), math.comb(n, size))
        total += level
        beams = min(width, level)
    return total


def _one(_n: int, _r: int, _params: SearchParams) -> int:
    return 1


@dataclass(frozen=True)
class Strategy:
    """One search strategy: where its function is, whether it is a baseline, how much it scores."""

    name: str
    #: ``module:function`` taking a :class:`pipeline.search.strategies.LayerProblem`, returning a ``StrategyResult``.
    function: str
    #: An upper bound on the sets it scores per layer: ``(n, r, search params) -> count``.
    planned: Callable[[int, int, SearchParams], int]
    #: What it scores per layer and how (docs/search.md).
    scores: str
    notes: str
    #: Also allowed in ``search.baselines`` (scored next to every search).
    baseline: bool = False
    #: Scored with :class:`pipeline.search.incremental.LazyScorer` (expert outputs on demand, children
    #: updated from their parent) instead of one dense pass with Gram matrices.
    incremental: bool = False

    def load(self) -> Callable[[Any], Any]:
        """The search function."""
        module, _, attr = self.function.partition(":")
        return getattr(importlib.import_module(module), attr)


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "enumerate", "pipeline.search.strategies:enumerate_layer", _enumerated,
            "all `C(n, r)` sets", "the paper's method, exact optimum of the loss",
        ),
        Strategy(
            "greedy", "pipeline.search.strategies:greedy_layer", lambda n, r, p: _dropping(n, r, 1),
            "`sum_{s=r}^{n-1} (s+1)` sets", "drop, one at a time, the expert whose removal costs least",
            incremental=True,
        ),
        Strategy(
            "beam", "pipeline.search.strategies:beam_layer", lambda n, r, p: _dropping(n, r, p.beam_width),
            "at most `beam_width x` greedy", "keep the `search.beam_width` best sets of each size",
            incremental=True,
        ),
        Strategy(
            "evolutionary", "pipeline.search.evolutionary:evolutionary_layer",
            lambda n, r, p: min(p.evolutionary.budget, math.comb(n, r)),
            "`search.evolutionary.budget` distinct sets",
            "EEP-style: tournament selection, crossover, mutation, (mu + lambda) survival; fitness = the loss",
        ),
        Strategy(
            "frequency", "pipeline.search.baselines:frequency_layer", _one,
            "1 set", "baseline: the `r` experts the full model routes most tokens to", baseline=True,
        ),
        Strategy(
            "random", "pipeline.search.baselines:random_layer", _one,
            "1 set", "baseline: `r` experts drawn uniformly, seeded by `(search.seed, layer)`", baseline=True,
        ),
        Strategy(
            "reap", "pipeline.search.baselines:reap_layer", _one,
            "1 set", "baseline: the top-`r` experts by REAP score", baseline=True,
        ),
    )
}

#: Allowed ``search.strategy`` values (``auto`` first) and ``search.baselines`` values.
STRATEGY_NAMES: tuple[str, ...] = (AUTO, *STRATEGIES)
BASELINE_NAMES: tuple[str, ...] = tuple(name for name, s in STRATEGIES.items() if s.baseline)


def get(name: str) -> Strategy:
    """The strategy called ``name``."""
    if name not in STRATEGIES:
        raise PipelineError(f"search.strategy: unknown strategy {name!r} (known: {', '.join(STRATEGY_NAMES)})")
    return STRATEGIES[name]


def resolve(strategy: str, n: int, r: int, enumerate_budget: int) -> str:
    """``auto`` -> ``enumerate`` when ``C(n, r) <= enumerate_budget``, else ``beam``; others unchanged."""
    if strategy != AUTO:
        return strategy
    return "enumerate" if math.comb(n, r) <= enumerate_budget else "beam"


def planned_candidates(strategy: str, n: int, r: int, params: SearchParams) -> int:
    """An upper bound on the sets ``strategy`` (resolved) scores per layer, before it runs."""
    return get(strategy).planned(n, r, params)


def strategies_table() -> str:
    """The markdown table of strategies in docs/search.md."""
    lines = ["| `search.strategy` | what it scores per layer | notes |", "|---|---|---|"]
    lines += [f"| `{s.name}` | {s.scores} | {s.notes} |" for s in STRATEGIES.values()]
    lines.append(f"| `{AUTO}` (default) | | `enumerate` when `C(n, r) <= search.enumerate_budget`, else `beam` |")
    return "\n".join(lines)
