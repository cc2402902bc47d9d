"""LFM2-MoE (``lfm2_moe``): sigmoid scores; experts chosen by score + the block's ``expert_bias``
(when ``use_expert_bias``); weights = sigmoid scores of the chosen experts, renormalised with
``norm_topk_prob`` (denominator + 1e-6), times ``routed_scaling_factor``; the first
``num_dense_layers`` layers are dense; short-convolution layers are untouched."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SigmoidBiasTopK


@register
class Lfm2MoeAdapter(MoEAdapter):
    """Liquid LFM2-8B-A1B and relatives (``lfm2_moe``); the layer's block is ``feed_forward``."""

    model_types = ("lfm2_moe",)
    family = "LFM2-MoE"
    num_experts_key = "num_experts"
    mlp_attr = "feed_forward"
    block_expert_tensors = ("expert_bias",)
    block_choice_bias_attr = "expert_bias"
    routing_doc = "sigmoid, bias-corrected top-k, x `routed_scaling_factor`"
    renormalized_doc = "`norm_topk_prob`"
    dense_layers_doc = "first `num_dense_layers`"
    notes_doc = "selection bias `expert_bias` lives on the block; sliced on export"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Sigmoid scores, top-k of score + bias, optional renormalisation (+1e-6), scale."""
        text = self.text_config(config)
        return SigmoidBiasTopK(
            top_k=self.top_k(config),
            n_group=1,
            topk_group=1,
            renormalize=bool(text.norm_topk_prob),
            scale=float(text.routed_scaling_factor),
            eps=1e-6,
        )

    def choice_bias(self, block: nn.Module) -> torch.Tensor | None:
        """``block.expert_bias`` when the model uses it."""
        return getattr(block, "expert_bias", None) if block.use_expert_bias else None
