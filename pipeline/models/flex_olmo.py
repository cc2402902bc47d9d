"""FlexOlmo: OLMoE's router (softmax top-k, ``norm_topk_prob``) in a post-norm decoder layer."""

from __future__ import annotations

from typing import Any

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SoftmaxTopK


@register
class FlexOlmoAdapter(MoEAdapter):
    """FlexOlmo (``flex_olmo``): the MoE block reads the residual stream (norms come after it)."""

    model_types = ("flex_olmo",)
    family = "FlexOlmo"
    num_experts_key = "num_experts"
    routing_doc = "softmax, top-k"
    renormalized_doc = "`norm_topk_prob`"
    notes_doc = "post-norm layer: the MoE input is the un-normalised residual stream"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Softmax over the experts, top-k, renormalised when ``norm_topk_prob``."""
        text = self.text_config(config)
        return SoftmaxTopK(top_k=self.top_k(config), renormalize=bool(text.norm_topk_prob))
