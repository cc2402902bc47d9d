"""AFMoE / Arcee Trinity (``afmoe``): sigmoid scores; experts chosen by score + the block's
``expert_bias``; weights = chosen scores renormalised, times ``route_scale``; shared experts; the
first ``num_dense_layers`` layers are dense. The router matrix is ``router.gate``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SigmoidBiasTopK


@register
class AfmoeAdapter(MoEAdapter):
    """Arcee Trinity (``afmoe``)."""

    model_types = ("afmoe",)
    family = "AFMoE (Arcee Trinity)"
    num_experts_key = "num_experts"
    router_attr = "router"
    router_expert_tensors = ("gate.weight",)
    block_expert_tensors = ("expert_bias",)
    block_choice_bias_attr = "expert_bias"
    shared_attrs = ("shared_experts",)
    routing_doc = "sigmoid, bias-corrected top-k, x `route_scale`"
    renormalized_doc = "yes"
    dense_layers_doc = "first `num_dense_layers`"
    notes_doc = "router matrix `router.gate`; selection bias on the block"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Sigmoid scores, top-k of score + bias, renormalised, scaled."""
        text = self.text_config(config)
        return SigmoidBiasTopK(
            top_k=self.top_k(config), n_group=1, topk_group=1, renormalize=True, scale=float(text.route_scale)
        )

    def router_weight(self, block: nn.Module) -> torch.Tensor:
        """``router.gate.weight`` ``[n, d]``."""
        return block.router.gate.weight

    def router_bias(self, block: nn.Module) -> torch.Tensor | None:
        """The router has no bias."""
        return None

    def router_decisions(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router takes ``[B, L, d]`` and the block's selection bias."""
        _logits, weights, idx = block.router(x.unsqueeze(0), block.expert_bias)
        return weights.float(), idx
