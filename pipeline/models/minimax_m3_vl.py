"""MiniMax-M3 language model (``minimax_m3_vl_text``): sigmoid scores, experts chosen by score +
``e_score_correction_bias``, weights renormalised; the block multiplies the routed sum by
``routed_scaling_factor`` (folded into the weights) and adds shared experts; dense layers from
``mlp_layer_types``."""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SigmoidBiasTopK


@register
class MiniMaxM3TextAdapter(MoEAdapter):
    """MiniMax-M3 text checkpoints (``minimax_m3_vl_text``); the multimodal wrapper is not covered."""

    model_types = ("minimax_m3_vl_text",)
    family = "MiniMax-M3 (text)"
    num_experts_key = "num_local_experts"
    choice_bias_attr = "e_score_correction_bias"
    shared_attrs = ("shared_experts",)
    routing_doc = "sigmoid, bias-corrected top-k, x `routed_scaling_factor`"
    renormalized_doc = "yes"
    dense_layers_doc = "`mlp_layer_types` = dense"
    notes_doc = "scaling applied by the block after the experts (folded into the weights)"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Sigmoid scores, top-k of score + bias, renormalised, times the block's scaling factor."""
        text = self.text_config(config)
        return SigmoidBiasTopK(
            top_k=self.top_k(config), n_group=1, topk_group=1, renormalize=True, eps=0.0,
            scale=float(text.routed_scaling_factor),
        )

    def routed_output_scale(self, block: nn.Module) -> float:
        """The block's ``routed_scaling_factor``."""
        return float(block.routed_scaling_factor)
