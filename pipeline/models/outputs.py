"""A MoE block's output on tokens: its own forward batch by batch, and ``Z_hat(S)`` as the search scores it.

The search's verification, the direct reference loss and export's equivalence check all compute
block outputs here; :mod:`pipeline.search.scoring` computes the same ``Z_hat(S)`` in Gram form.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.models.base import MoEAdapter


@torch.no_grad()
def block_outputs(
    adapter: MoEAdapter, block: nn.Module, x: torch.Tensor, tokens_per_batch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch of ``tokens_per_batch`` consecutive tokens of ``x`` (``[..., d]``), on the block's device and
    in its dtype, with the block's own output on it ``[T, d]``."""
    param = next(block.parameters())
    flat = x.reshape(-1, x.shape[-1])
    for s in range(0, flat.shape[0], tokens_per_batch):
        xb = flat[s : s + tokens_per_batch].to(param.device, param.dtype)
        yield xb, adapter.block_output(block, xb)


def outputs_of(adapter: MoEAdapter, block: nn.Module, x: torch.Tensor, tokens_per_batch: int) -> list[torch.Tensor]:
    """The block's own output on each batch of :func:`block_outputs`."""
    return [z for _, z in block_outputs(adapter, block, x, tokens_per_batch)]


@torch.no_grad()
def routed_output(
    adapter: MoEAdapter, block: nn.Module, config: Any, x: torch.Tensor, kept: Sequence[int] | None = None
) -> torch.Tensor:
    """``sum_i w_i E_i(x)`` over the routed experts when only ``kept`` remain, in float32 ``[T, d]``.

    Weights and ids come from ``adapter.route`` (what the search scores), expert outputs from
    ``adapter.expert_outputs`` on ``block`` (the unpruned block; ids are its own).
    """
    weights, ids = adapter.route(block, adapter.router_logits(block, x), config, kept)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in torch.unique(ids).tolist():
        tok, slot = (ids == expert).nonzero(as_tuple=True)
        y = adapter.expert_outputs(block, x[tok], [expert])[:, 0].float()
        out.index_add_(0, tok, y * weights[tok, slot].float().unsqueeze(-1))
    return out


@torch.no_grad()
def search_output(
    adapter: MoEAdapter, block: nn.Module, config: Any, x: torch.Tensor, kept: Sequence[int] | None = None
) -> torch.Tensor:
    """``Z_hat(S)``: the block's output keeping ``kept`` as the search computes it, float32 ``[T, d]``.

    Shared experts (never pruned) contribute the block output minus its routed part.
    """
    out = routed_output(adapter, block, config, x, kept)
    if adapter.shared_attrs:
        full = adapter.block_output(block, x).float()
        out += full - routed_output(adapter, block, config, x, None)
    return out
