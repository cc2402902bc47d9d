"""Qwen3-MoE: softmax top-k, renormalised with ``norm_topk_prob`` (true in the released models);
no shared experts; ``mlp_only_layers`` / ``decoder_sparse_step`` make some layers dense."""

from __future__ import annotations

from typing import Any

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SoftmaxTopK


@register
class Qwen3MoeAdapter(MoEAdapter):
    """Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder MoE (``qwen3_moe``)."""

    model_types = ("qwen3_moe",)
    family = "Qwen3-MoE"
    num_experts_key = "num_experts"
    routing_doc = "softmax, top-k"
    renormalized_doc = "`norm_topk_prob` (true in released models)"
    dense_layers_doc = "`mlp_only_layers`, `decoder_sparse_step`"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Softmax over the experts, top-k, renormalised when ``norm_topk_prob``."""
        text = self.text_config(config)
        return SoftmaxTopK(top_k=self.top_k(config), renormalize=bool(text.norm_topk_prob))
