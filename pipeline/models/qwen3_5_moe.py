"""Qwen3.5-MoE language model (``qwen3_5_moe_text``): softmax top-k, always renormalised, plus a
sigmoid-gated shared expert (see :mod:`pipeline.models.qwen2_moe`), under hybrid attention."""

from __future__ import annotations

from typing import Any

from pipeline.models.qwen2_moe import Qwen2MoeAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SoftmaxTopK


@register
class Qwen35MoeTextAdapter(Qwen2MoeAdapter):
    """Qwen3.5-MoE text checkpoints (``qwen3_5_moe_text``); the multimodal wrapper is not covered."""

    model_types = ("qwen3_5_moe_text",)
    family = "Qwen3.5-MoE (text)"
    renormalized_doc = "yes"
    dense_layers_doc = "none"
    notes_doc = "linear-attention (Gated DeltaNet) layers are untouched"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Softmax over the experts, top-k, renormalised."""
        return SoftmaxTopK(top_k=self.top_k(config), renormalize=True)
