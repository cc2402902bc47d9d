"""Inkling 2 text (``inkling2_text``): sigmoid scores (``scoring_func``), experts chosen by score +
``e_score_correction_bias``, weights = chosen scores renormalised, times ``route_scale``; no
shared experts; attention-residual blocks are untouched."""

from __future__ import annotations

from typing import Any

from pipeline.errors import PipelineError
from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SigmoidBiasTopK


@register
class Inkling2TextAdapter(MoEAdapter):
    """Inkling 2 language models (``inkling2_text``); the multimodal wrapper is not covered."""

    model_types = ("inkling2_text",)
    family = "Inkling 2 (text)"
    num_experts_key = "n_routed_experts"
    choice_bias_attr = "e_score_correction_bias"
    router_fp32 = True
    routing_doc = "sigmoid, bias-corrected top-k, x `route_scale`"
    renormalized_doc = "yes"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Sigmoid scores, top-k of score + bias, renormalised, scaled."""
        text = self.text_config(config)
        if text.scoring_func != "sigmoid":
            raise PipelineError(f"Inkling 2 scoring_func {text.scoring_func!r} is not supported (sigmoid)")
        return SigmoidBiasTopK(
            top_k=self.top_k(config), n_group=1, topk_group=1, renormalize=True, scale=float(text.route_scale)
        )
