"""Phi-3.5-MoE (``phimoe``): the SparseMixer router, which at inference is deterministic top-2.

Expert 1 is the arg-max logit, weighted by its softmax probability among the logits within a
relative ``2 * router_jitter_noise`` of the maximum; expert 2 is the arg-max of the other logits,
weighted the same way among them. The two weights are not renormalised. (Training samples experts
with Gumbel noise; pruning and inference run in eval mode, where the rule is exact.)
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import PipelineError
from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SparseMixer


@register
class PhimoeAdapter(MoEAdapter):
    """Phi-3.5-MoE-instruct (``phimoe``); the router is ``block.router`` (a bias-free linear layer)."""

    model_types = ("phimoe",)
    family = "Phi-3.5-MoE"
    num_experts_key = "num_local_experts"
    router_attr = "router"
    routing_doc = "SparseMixer (eval): masked softmax per pick, top-2"
    renormalized_doc = "no"
    notes_doc = "always top-2 whatever `num_experts_per_tok` says (as the model's code)"

    def top_k(self, config: Any) -> int:
        """SparseMixer always routes to two experts."""
        return 2

    def top_k_updates(self, config: Any, k: int) -> dict[str, Any]:
        """SparseMixer's two picks are fixed in the model's code: no static top-k reduction."""
        raise PipelineError(f"export.top_k: {self.family} always routes to 2 experts (its top-k cannot be lowered)")

    def routing_rule(self, config: Any) -> RoutingRule:
        """SparseMixer with the config's ``router_jitter_noise`` as its threshold."""
        return SparseMixer(top_k=2, jitter_eps=float(self.text_config(config).router_jitter_noise))
