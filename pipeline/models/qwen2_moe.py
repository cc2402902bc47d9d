"""Qwen1.5-MoE / Qwen2-MoE: softmax top-k (renormalised only with ``norm_topk_prob``) plus one
shared expert whose output is scaled by a sigmoid gate; ``mlp_only_layers`` and
``decoder_sparse_step`` make some layers dense."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SoftmaxTopK


@register
class Qwen2MoeAdapter(MoEAdapter):
    """Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B (both ``qwen2_moe``)."""

    model_types = ("qwen2_moe",)
    family = "Qwen1.5-MoE / Qwen2-MoE"
    num_experts_key = "num_experts"
    shared_attrs = ("shared_expert", "shared_expert_gate")
    routing_doc = "softmax, top-k"
    renormalized_doc = "`norm_topk_prob` (default no)"
    dense_layers_doc = "`mlp_only_layers`, `decoder_sparse_step`"
    shared_doc = "`shared_expert` x `sigmoid(shared_expert_gate(x))`"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Softmax over the experts, top-k, renormalised when ``norm_topk_prob``."""
        text = self.text_config(config)
        return SoftmaxTopK(top_k=self.top_k(config), renormalize=bool(text.norm_topk_prob))

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``sigmoid(shared_expert_gate(x)) * shared_expert(x)``."""
        return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
