"""Mellum MoE (``mellum``): softmax top-k renormalised with ``norm_topk_prob``; no shared
experts; dense layers from ``mlp_layer_types``."""

from __future__ import annotations

from typing import Any

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SoftmaxTopK


@register
class MellumAdapter(MoEAdapter):
    """JetBrains Mellum MoE (``mellum``)."""

    model_types = ("mellum",)
    family = "Mellum"
    num_experts_key = "num_experts"
    routing_doc = "softmax, top-k"
    renormalized_doc = "`norm_topk_prob`"
    dense_layers_doc = "`mlp_layer_types` = dense"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Softmax over the experts, top-k, renormalised when ``norm_topk_prob``."""
        text = self.text_config(config)
        return SoftmaxTopK(top_k=self.top_k(config), renormalize=bool(text.norm_topk_prob))
