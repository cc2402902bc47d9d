"""OLMoE: softmax top-k over 64 experts, not renormalised unless ``norm_topk_prob``; no shared experts."""

from __future__ import annotations

from typing import Any

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SoftmaxTopK


@register
class OlmoeAdapter(MoEAdapter):
    """OLMoE-1B-7B (``olmoe``)."""

    model_types = ("olmoe",)
    family = "OLMoE"
    num_experts_key = "num_experts"
    routing_doc = "softmax, top-k"
    renormalized_doc = "`norm_topk_prob` (default no)"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Softmax over the experts, top-k, renormalised when ``norm_topk_prob``."""
        text = self.text_config(config)
        return SoftmaxTopK(top_k=self.top_k(config), renormalize=bool(text.norm_topk_prob))
