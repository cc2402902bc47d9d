"""MiniMax-M2 (``minimax_m2``): sigmoid scores; experts chosen by score + the block's
``e_score_correction_bias``; weights = the chosen sigmoid scores, renormalised; no shared experts."""

from __future__ import annotations

from typing import Any

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SigmoidBiasTopK


@register
class MiniMaxM2Adapter(MoEAdapter):
    """MiniMax-M2 / M2.1 (``minimax_m2``)."""

    model_types = ("minimax_m2",)
    family = "MiniMax-M2"
    num_experts_key = "num_local_experts"
    block_expert_tensors = ("e_score_correction_bias",)
    block_choice_bias_attr = "e_score_correction_bias"
    routing_doc = "sigmoid, bias-corrected top-k"
    renormalized_doc = "yes"
    notes_doc = "selection bias lives on the block; sliced on export"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Sigmoid scores, top-k of score + bias, renormalised."""
        return SigmoidBiasTopK(top_k=self.top_k(config), n_group=1, topk_group=1, renormalize=True, eps=0.0)
