"""One global expert budget split across MoE layers (``search.allocation: global``, method.md §10).

Each layer's search reports its loss curve ``L_l(r)``: the best kept set it found at every size
``r`` from ``top_k`` to ``n`` (``n`` keeps the layer whole, loss 0). :func:`split_budget` chooses
the sizes ``r_l`` with ``sum_l r_l = R`` that minimise ``sum_l L_l(r_l) / ||Z_l||``, exactly, by
dynamic programming over layers and budget (``O(L x R x n)``).

Normalisation: each layer's loss is divided by ``sum_b ||Z_b||_F``, the same sum of per-batch
norms of that layer's full output on the calibration data; the quotient is the layer's relative
reconstruction error, 0 when nothing changes and about 1 when the layer's output is lost. Raw
losses are not comparable across layers: the MoE output norms grow with depth, so a raw sum would
spend the budget on the layers with the largest outputs rather than on those whose outputs pruning
damages most.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from pipeline.errors import PipelineError
from pipeline.search.run import LayerResult


def split_budget(costs: Sequence[Mapping[int, float]], total: int) -> list[int]:
    """The sizes, one per layer, with ``sum = total`` that minimise the summed cost; exact.

    ``costs[l]`` maps each size layer ``l`` may keep to its cost. Among equal sums the split with
    the lexicographically largest sizes from the last layer backwards is chosen (deterministic).
    Raises :class:`PipelineError` when no split reaches ``total``.
    """
    if not costs:
        raise PipelineError("allocation: no layers to split the budget across")
    # best[b]: the least cost of the layers so far using exactly b experts; choice[l][b]: layer l's size.
    best: dict[int, float] = {0: 0.0}
    choices: list[dict[int, int]] = []
    for layer_costs in costs:
        nxt: dict[int, float] = {}
        pick: dict[int, int] = {}
        for used, cost in best.items():
            for size in sorted(layer_costs):
                b = used + size
                if b > total:
                    continue
                value = cost + float(layer_costs[size])
                if b not in nxt or value < nxt[b] or (value == nxt[b] and size > pick[b]):
                    nxt[b], pick[b] = value, size
        best = nxt
        choices.append(pick)
    if total not in best or not math.isfinite(best[total]):
        lo = sum(min(c) for c in costs)
        hi = sum(max(c) for c in costs)
        raise PipelineError(f"allocation: a budget of {total} experts cannot be split (between {lo} and {hi} fit)")
    sizes: list[int] = []
    b = total
    for pick in reversed(choices):
        sizes.append(pick[b])
        b -= pick[b]
    return sizes[::-1]


def relative_curve(result: LayerResult) -> dict[int, float]:
    """``{r: L_l(r) / sum_b ||Z_b||_F}`` of one layer searched with ``allocation: global``."""
    if result.curve is None or not result.output_norm:
        raise PipelineError(f"layer {result.layer}: the search recorded no loss curve (search.allocation: global)")
    norm = float(result.output_norm)
    return {int(point["r"]): float(point["loss"]) / norm for point in result.curve}


def allocate(results: Sequence[LayerResult], r: int) -> list[LayerResult]:
    """Each layer's result at its share of the budget ``r x len(results)`` (:func:`split_budget`).

    The size-``r`` set the search chose is kept as the baseline ``uniform``; the other baselines
    stay those scored at ``r``.
    """
    sizes = split_budget([relative_curve(res) for res in results], r * len(results))
    out = []
    for res, size in zip(results, sizes, strict=True):
        point = next(p for p in res.curve or [] if p["r"] == size)
        baselines = {"uniform": {"kept": list(res.kept), "loss": res.loss}, **res.baselines}
        out.append(dataclasses.replace(res, kept=list(point["kept"]), loss=float(point["loss"]), baselines=baselines))
    return out


__all__ = ["allocate", "relative_curve", "split_budget"]
