"""ERNIE-4.5 MoE (``ernie4_5_moe``): softmax probabilities; experts chosen by probability +
``e_score_correction_bias`` (``gate.moe_statics``, shape ``[1, n]``); weights are the chosen
probabilities over ``max(their sum, moe_norm_min)``; optional shared experts; dense layers outside
``moe_layer_start_index..moe_layer_end_index`` / ``moe_layer_interval``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SoftmaxBiasTopK


@register
class Ernie45MoeAdapter(MoEAdapter):
    """ERNIE-4.5-21B-A3B / 300B-A47B text models (``ernie4_5_moe``)."""

    model_types = ("ernie4_5_moe",)
    family = "ERNIE-4.5 MoE"
    num_experts_key = "moe_num_experts"
    top_k_key = "moe_k"
    shared_attrs = ("shared_experts",)
    router_fp32 = True
    routing_doc = "softmax, bias-corrected top-k"
    renormalized_doc = "yes (denominator clamped at `moe_norm_min`)"
    dense_layers_doc = "outside `moe_layer_start_index`..`moe_layer_end_index` / `moe_layer_interval`"
    notes_doc = "`gate.moe_statics.e_score_correction_bias` `[1, n]` sliced on dim 1"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Softmax, top-k of probability + bias, renormalised with the ``moe_norm_min`` floor."""
        return SoftmaxBiasTopK(top_k=self.top_k(config), norm_min=float(self.text_config(config).moe_norm_min))

    def choice_bias(self, block: nn.Module) -> torch.Tensor | None:
        """``gate.moe_statics.e_score_correction_bias`` as ``[n]``."""
        return block.gate.moe_statics.e_score_correction_bias.reshape(-1)

    def expert_tensor_dim(self, name: str, tensor: torch.Tensor, n: int) -> int | None:
        """The selection bias is ``[1, n]``: experts on dim 1."""
        if name == "gate.moe_statics.e_score_correction_bias" and tensor.dim() == 2 and tensor.shape[-1] == n:
            return 1
        return super().expert_tensor_dim(name, tensor, n)
