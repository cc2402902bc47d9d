"""gpt-oss (``gpt_oss``): router with a bias, top-k of the logits, softmax over those k; experts
with biases and a clamped SwiGLU, stored transposed (``gate_up_proj [n, d, 2f]``)."""

from __future__ import annotations

from typing import Any

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, TopKSoftmax


@register
class GptOssAdapter(MoEAdapter):
    """gpt-oss-20b / 120b (``gpt_oss``); block ``mlp`` returns ``(output, router_scores)``."""

    model_types = ("gpt_oss",)
    family = "gpt-oss"
    num_experts_key = "num_local_experts"
    router_attr = "router"
    routing_doc = "top-k of logits (+ router bias), softmax over the k"
    renormalized_doc = "yes (by construction)"
    eager_handles_sentinel = False
    notes_doc = "router bias and expert biases sliced on export"
    neuron_layout = {  # transposed; gate and up columns alternate (gate_up[..., ::2], gate_up[..., 1::2])
        "gate_up_proj": (1, 2, True),
        "gate_up_proj_bias": (0, 2, True),
        "down_proj": (0, 1, False),
    }

    def routing_rule(self, config: Any) -> RoutingRule:
        """Top-k logits, softmax over them."""
        return TopKSoftmax(top_k=self.top_k(config))
