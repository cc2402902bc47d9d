"""MiniMax-Text-01: Mixtral's router (softmax, top-k, renormalised) under hybrid lightning/full attention."""

from __future__ import annotations

from typing import Any

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SoftmaxTopK


@register
class MiniMaxAdapter(MoEAdapter):
    """MiniMax-Text-01 (``minimax``): every layer is MoE; the attention type alternates."""

    model_types = ("minimax",)
    family = "MiniMax-Text-01"
    num_experts_key = "num_local_experts"
    routing_doc = "softmax, top-k"
    renormalized_doc = "yes"
    notes_doc = "lightning (linear) attention layers are untouched"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Softmax over the experts, top-k, renormalised (as Mixtral)."""
        return SoftmaxTopK(top_k=self.top_k(config), renormalize=True)
