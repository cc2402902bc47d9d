"""Mixtral: softmax router, top-2, weights renormalised over the chosen experts; no shared experts."""

from __future__ import annotations

from typing import Any

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SoftmaxTopK


@register
class MixtralAdapter(MoEAdapter):
    """Mixtral-8x7B / 8x22B and the embedded toy model."""

    model_types = ("mixtral",)
    family = "Mixtral"
    num_experts_key = "num_local_experts"
    routing_doc = "softmax, top-k"
    renormalized_doc = "yes"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Softmax over the experts, top-k, renormalised."""
        return SoftmaxTopK(top_k=self.top_k(config), renormalize=True)
