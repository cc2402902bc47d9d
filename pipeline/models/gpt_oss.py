"""gpt-oss (``gpt_oss``): router with a bias, top-k of the logits, softmax over those k; experts
with biases and a clamped SwiGLU, stored transposed (``gate_up_proj [n, d, 2f]``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.models.base import MoEAdapter, RouterTransform, RouterTransformHandle
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
    notes_doc = "router bias and expert biases sliced on export"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Top-k logits, softmax over them."""
        return TopKSoftmax(top_k=self.top_k(config))

    def add_router_transform(self, block: nn.Module, transform: RouterTransform) -> RouterTransformHandle:
        """As the base, but gpt-oss's eager experts loop cannot take the sentinel index.

        Under ``experts_implementation="eager"`` a dropped slot is sent to expert 0 with weight 0
        (the output is the same, the expert is still computed); ``grouped_mm`` skips it.
        """
        experts = block.experts

        def eager_safe(weights: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            new_w, new_idx = transform(weights, idx)
            if getattr(experts.config, "_experts_implementation", None) == "eager":
                dropped = new_idx >= experts.num_experts
                new_w = new_w.masked_fill(dropped, 0.0)
                new_idx = new_idx.masked_fill(dropped, 0)
            return new_w, new_idx

        return super().add_router_transform(block, eager_safe)
