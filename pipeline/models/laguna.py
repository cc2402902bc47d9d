"""Laguna (``laguna``): optional tanh soft-capping of the router logits, sigmoid scores, experts
chosen by score + ``e_score_correction_bias``, weights = chosen scores renormalised; the block
multiplies the routed sum by ``moe_routed_scaling_factor`` (folded into the weights) and adds a
shared expert; dense layers from ``mlp_layer_types``."""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SigmoidBiasTopK


@register
class LagunaAdapter(MoEAdapter):
    """Laguna (``laguna``)."""

    model_types = ("laguna",)
    family = "Laguna"
    num_experts_key = "num_experts"
    choice_bias_attr = "e_score_correction_bias"
    shared_attrs = ("shared_experts",)
    routing_doc = "soft-capped logits, sigmoid, bias-corrected top-k, x `moe_routed_scaling_factor`"
    renormalized_doc = "yes"
    dense_layers_doc = "`mlp_layer_types` = dense"
    notes_doc = "scaling applied by the block after the experts (folded into the weights)"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Soft-cap, sigmoid, top-k of score + bias, renormalised, times the block's scaling factor."""
        text = self.text_config(config)
        return SigmoidBiasTopK(
            top_k=self.top_k(config), n_group=1, topk_group=1, renormalize=True, eps=0.0,
            scale=float(text.moe_routed_scaling_factor), softcap=float(text.moe_router_logit_softcapping or 0.0),
        )

    def routed_output_scale(self, block: nn.Module) -> float:
        """The block's ``routed_scaling_factor``."""
        return float(block.routed_scaling_factor)
