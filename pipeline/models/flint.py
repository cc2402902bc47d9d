"""Flint (``flint``): sigmoid of the logits, top-k, renormalised with ``norm_topk_prob``; an
ungated shared expert; ``mlp_only_layers`` / ``decoder_sparse_step`` make some layers dense."""

from __future__ import annotations

from typing import Any

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SigmoidBiasTopK


@register
class FlintAdapter(MoEAdapter):
    """Flint (``flint``)."""

    model_types = ("flint",)
    family = "Flint"
    num_experts_key = "num_experts"
    shared_attrs = ("shared_expert",)
    router_fp32 = True
    routing_doc = "sigmoid, top-k"
    renormalized_doc = "`norm_topk_prob`"
    dense_layers_doc = "`mlp_only_layers`, `decoder_sparse_step`"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Sigmoid scores, top-k, renormalised when ``norm_topk_prob``."""
        text = self.text_config(config)
        return SigmoidBiasTopK(
            top_k=self.top_k(config), n_group=1, topk_group=1, renormalize=bool(text.norm_topk_prob), eps=0.0
        )
