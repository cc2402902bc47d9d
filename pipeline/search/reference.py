"""The straightforward loss of method.md §2, one candidate at a time: the reference for the fast path.

For each kept set the block is pruned with the adapter (exactly what export writes) and the pruned
block's own forward is run on each calibration batch; ``loss = sum_b ||Z_b - Z_hat_b||_F`` in float64.
Used by the tests, the speed benchmark and the ``search.verify`` check of every chosen set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pipeline.models.base import MoEAdapter
from pipeline.models.outputs import outputs_of


@torch.no_grad()
def reference_losses(
    adapter: MoEAdapter,
    block: nn.Module,
    config: Any,
    x: torch.Tensor,
    candidates: Sequence[Sequence[int]] | torch.Tensor,
    *,
    tokens_per_batch: int,
    layer_idx: int = 0,
    full: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``loss(S)`` for each kept set ``S``, by pruning the block and running its forward per batch.

    ``x`` is ``[N, L, d]`` or ``[T, d]`` in sequence order; ``full`` is the unpruned block's
    :func:`~pipeline.models.outputs.outputs_of` on it, where the caller already has them. Returns ``[C]`` float64.
    """
    rows = [sorted(int(e) for e in row) for row in (candidates.tolist() if isinstance(candidates, torch.Tensor) else candidates)]
    flat = x.reshape(-1, x.shape[-1])
    if full is None:
        full = outputs_of(adapter, block, flat, tokens_per_batch)
    n = adapter.block_num_experts(block)
    out = torch.empty(len(rows), dtype=torch.float64)
    pruned_configs: dict[int, Any] = {}
    for c, kept in enumerate(rows):
        m = len(kept)
        if m not in pruned_configs:
            pruned_configs[m] = config if m == n else adapter.pruned_config(config, m)
        pruned = adapter.prune_block(block, kept, pruned_configs[m], layer_idx)
        approx = outputs_of(adapter, pruned, flat, tokens_per_batch)
        total = 0.0
        for z, z_hat in zip(full, approx, strict=True):
            total += float(torch.linalg.vector_norm((z.double() - z_hat.double()).reshape(-1)))
        out[c] = total
    return out
