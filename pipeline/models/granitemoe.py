"""IBM Granite MoE (``granitemoe``, ``granitemoeshared``): top-k of the router logits, softmax
over those k (renormalised by construction); GraniteMoeShared adds an always-on shared MLP."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, TopKSoftmax


@register
class GraniteMoeAdapter(MoEAdapter):
    """Granite-3.0/3.1 MoE (``granitemoe``): block ``block_sparse_moe``, router ``router``."""

    model_types = ("granitemoe",)
    family = "Granite MoE"
    num_experts_key = "num_local_experts"
    mlp_attr = "block_sparse_moe"
    router_attr = "router"
    routing_doc = "top-k of logits, softmax over the k"
    renormalized_doc = "yes (by construction)"
    notes_doc = "the layer scales the block output by `residual_multiplier` (outside the block)"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Top-k logits, softmax over them."""
        return TopKSoftmax(top_k=self.top_k(config))


@register
class GraniteMoeSharedAdapter(GraniteMoeAdapter):
    """Granite MoE with a shared MLP (``granitemoeshared``): ``layer.shared_mlp`` runs beside the block.

    The shared MLP lives in the decoder layer, not in the MoE block, so it is neither part of the
    block output nor touched by pruning.
    """

    model_types = ("granitemoeshared",)
    family = "Granite MoE (shared)"
    shared_doc = "`shared_mlp` (in the decoder layer)"
    notes_doc = "the shared MLP is outside the MoE block; untouched"

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """None: the shared MLP is outside the MoE block."""
        return None
