"""Jamba (``jamba``): Mamba / attention hybrid whose MoE layers (every ``expert_layer_period``-th,
from ``expert_layer_offset``) use softmax top-k without renormalisation; the others are dense."""

from __future__ import annotations

from typing import Any

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SoftmaxTopK


@register
class JambaAdapter(MoEAdapter):
    """AI21 Jamba (``jamba``); the layer's block is ``feed_forward``, its router ``router``."""

    model_types = ("jamba",)
    family = "Jamba"
    num_experts_key = "num_experts"
    mlp_attr = "feed_forward"
    router_attr = "router"
    routing_doc = "softmax, top-k"
    renormalized_doc = "no"
    dense_layers_doc = "off `expert_layer_period` / `expert_layer_offset`"
    notes_doc = "Mamba layers are untouched"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Softmax over the experts, top-k, not renormalised."""
        return SoftmaxTopK(top_k=self.top_k(config), renormalize=False)
