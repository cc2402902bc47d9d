"""Hunyuan v3 (``hy_v3``): sigmoid scores; experts chosen by score + the block's
``e_score_correction_bias``; weights = chosen scores renormalised, times ``router_scaling_factor``;
shared experts; dense layers from ``mlp_layer_types``."""

from __future__ import annotations

from typing import Any

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SigmoidBiasTopK


@register
class HYV3Adapter(MoEAdapter):
    """Tencent Hunyuan v3 (``hy_v3``)."""

    model_types = ("hy_v3",)
    family = "Hunyuan v3"
    num_experts_key = "num_experts"
    shared_attrs = ("shared_experts",)
    block_expert_tensors = ("e_score_correction_bias",)
    block_choice_bias_attr = "e_score_correction_bias"
    router_fp32 = True
    routing_doc = "sigmoid, bias-corrected top-k, x `router_scaling_factor`"
    renormalized_doc = "yes"
    dense_layers_doc = "`mlp_layer_types` = dense"
    notes_doc = "selection bias lives on the block; sliced on export"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Sigmoid scores, top-k of score + bias, renormalised, scaled."""
        text = self.text_config(config)
        return SigmoidBiasTopK(
            top_k=self.top_k(config), n_group=1, topk_group=1, renormalize=True,
            scale=float(text.router_scaling_factor),
        )
