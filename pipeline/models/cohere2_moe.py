"""Cohere2-MoE (``cohere2_moe``): top-k of the router logits, then softmax over them or their
sigmoid (``expert_selection_fn``; sigmoid renormalised with ``norm_topk_prob``); optional shared
experts combined by ``sum`` or ``average``; dense layers from ``mlp_layer_types``.

With ``average`` the block returns ``(routed + shared) / 2``: the adapter's routing weights carry
the factor 1/2 (and so does :meth:`shared_output`), so the output is still ``sum w_i E_i + shared``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, TopKScores


@register
class Cohere2MoeAdapter(MoEAdapter):
    """Cohere Command MoE models (``cohere2_moe``)."""

    model_types = ("cohere2_moe",)
    family = "Cohere2-MoE"
    num_experts_key = "num_experts"
    shared_attrs = ("shared_experts",)
    routing_doc = "top-k of logits, then softmax over the k (or sigmoid)"
    renormalized_doc = "softmax: yes; sigmoid: `norm_topk_prob`"
    dense_layers_doc = "`mlp_layer_types` = dense"
    notes_doc = "`average` shared-expert combination folded in as weight 1/2"

    def _averaged(self, config: Any) -> bool:
        text = self.text_config(config)
        if text.shared_expert_combination_strategy not in ("sum", "average"):
            raise PipelineError(
                f"Cohere2-MoE shared_expert_combination_strategy {text.shared_expert_combination_strategy!r} "
                "is not supported (sum, average)"
            )
        return text.num_shared_experts > 0 and text.shared_expert_combination_strategy == "average"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Top-k logits, softmax or sigmoid, halved under ``average``."""
        text = self.text_config(config)
        if text.expert_selection_fn not in ("softmax", "sigmoid"):
            raise PipelineError(f"Cohere2-MoE expert_selection_fn {text.expert_selection_fn!r} is not supported")
        return TopKScores(
            top_k=self.top_k(config),
            activation=text.expert_selection_fn,
            renormalize=bool(text.norm_topk_prob),
            scale=0.5 if self._averaged(config) else 1.0,
        )

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The shared experts' output, halved under ``average``."""
        if block.num_shared_experts == 0:
            return None
        out = block.shared_experts(x)
        return out / 2 if block.shared_expert_combination_strategy == "average" else out

    def routed_output_scale(self, block: nn.Module) -> float:
        """1/2 under ``average`` with shared experts, else 1."""
        return 0.5 if block.num_shared_experts > 0 and block.shared_expert_combination_strategy == "average" else 1.0
