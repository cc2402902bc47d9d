"""Kolibri (``kolibri1``): experts chosen by logit + ``e_score_correction_bias``; weights are the
sigmoid of the chosen logits, renormalised with ``norm_topk_prob``; a shared expert in every layer."""

from __future__ import annotations

from typing import Any

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import LogitBiasSigmoidTopK, RoutingRule


@register
class Kolibri1Adapter(MoEAdapter):
    """Kolibri-1 (``kolibri1``)."""

    model_types = ("kolibri1",)
    family = "Kolibri-1"
    num_experts_key = "num_experts"
    choice_bias_attr = "e_score_correction_bias"
    shared_attrs = ("shared_experts",)
    router_fp32 = True
    routing_doc = "top-k of logit + bias, sigmoid of the chosen logits"
    renormalized_doc = "`norm_topk_prob` (default no)"
    notes_doc = "selection bias is added to the logits (not the scores); sliced on export"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Top-k of logit + bias; sigmoid weights, renormalised when ``norm_topk_prob``."""
        return LogitBiasSigmoidTopK(top_k=self.top_k(config), renormalize=bool(self.text_config(config).norm_topk_prob))
