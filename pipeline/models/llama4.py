"""Llama 4 text (``llama4_text``): top-k of the router logits; the chosen expert's *input* is
scaled by the sigmoid of its logit; a shared expert runs on every token; dense layers interleave
(``moe_layers`` / ``interleave_moe_layer_step``).

The block computes ``shared(x) + sum_{i in top-k} E_i(sigmoid(l_i) * x)``. Because ``sigmoid(l_i)``
depends only on expert ``i``'s own logit, not on which other experts exist, the adapter folds it
into the expert outputs (``expert_outputs`` returns ``E_i(sigmoid(l_i) * x)``) and the routing
weights are 1. The decomposition is exact, so search, export and the export-equivalence check
work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models.base import MoEAdapter, RouterTransform, RouterTransformHandle
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, TopKUnitWeights


@register
class Llama4TextAdapter(MoEAdapter):
    """Llama-4 Scout / Maverick language models (``llama4_text``); block ``feed_forward``."""

    model_types = ("llama4_text",)
    family = "Llama 4 (text)"
    num_experts_key = "num_local_experts"
    mlp_attr = "feed_forward"
    router_attr = "router"
    shared_attrs = ("shared_expert",)
    routing_doc = "top-k of logits; sigmoid(logit) scales the expert input"
    renormalized_doc = "n/a (weights folded into expert outputs)"
    dense_layers_doc = "layers not in `moe_layers`"
    notes_doc = "expert outputs are `E_i(sigmoid(l_i) x)`, weights 1; router transforms may only drop experts"
    neuron_layout = {"gate_up_proj": (1, 2, False), "down_proj": (0, 1, False)}  # stored transposed: [d, 2f], [f, d]

    def routing_rule(self, config: Any) -> RoutingRule:
        """Top-k logits; unit weights (the sigmoid lives in :meth:`expert_outputs`)."""
        return TopKUnitWeights(top_k=self.top_k(config))

    def expert_outputs(self, block: nn.Module, x: torch.Tensor, experts: Sequence[int] | None = None) -> torch.Tensor:
        """``E_i(sigmoid(l_i) * x)`` for each listed expert ``i`` on every token: ``[T, m, d]``."""
        module = block.experts
        ids = list(range(self.block_num_experts(block))) if experts is None else list(experts)
        logits = nn.functional.linear(x.to(block.router.weight.dtype), block.router.weight)
        scale = torch.sigmoid(logits.float()).to(logits.dtype)
        out = x.new_empty((x.shape[0], len(ids), x.shape[-1]))
        for j, e in enumerate(ids):
            h = x * scale[:, e : e + 1]
            gate, up = (h @ module.gate_up_proj[e]).chunk(2, dim=-1)
            out[:, j] = (up * module.act_fn(gate)) @ module.down_proj[e]
        return out

    def router_decisions(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's chosen experts (its non-zero input scales), with unit weights."""
        scores, _logits = block.router(x)
        idx = torch.topk(scores, block.router.top_k, dim=1)[1]
        return torch.ones(idx.shape, dtype=torch.float32, device=idx.device), idx

    def add_router_transform(self, block: nn.Module, transform: RouterTransform) -> RouterTransformHandle:
        """Let ``transform`` drop experts (sentinel index); weights stay 1 (see the module doc).

        Llama 4's experts run densely on scaled inputs, so a dropped expert gets a zero input
        (and, having no biases, a zero output); any other change of the routing is refused.
        """
        k, n = block.router.top_k, block.router.num_experts

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            scores, logits = output
            idx = torch.topk(logits, k, dim=1)[1]
            weights = torch.ones(idx.shape, dtype=torch.float32, device=idx.device)
            new_w, new_idx = transform(weights, idx)
            dropped = new_idx >= n
            if not torch.equal(new_idx[~dropped], idx[~dropped]) or not torch.equal(new_w[~dropped], weights[~dropped]):
                raise PipelineError("Llama 4 router transforms may only drop experts (sentinel index)")
            keep = torch.ones_like(scores).scatter(1, idx, (~dropped).to(scores.dtype))
            return scores * keep, logits

        return RouterTransformHandle(block.router.register_forward_hook(hook), None)
