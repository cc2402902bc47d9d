"""Beam (``beam``): DeepSeek-V3's sigmoid, bias-corrected, group-limited choice; weights
renormalised with ``norm_topk_prob``; the block multiplies the routed sum by
``routed_scaling_factor`` (folded into the weights); no shared experts; dense layers from
``mlp_layer_types``."""

from __future__ import annotations

from torch import nn

from pipeline.models.deepseek_v3 import SigmoidGroupRouterAdapter
from pipeline.models.registry import register


@register
class BeamAdapter(SigmoidGroupRouterAdapter):
    """Beam (``beam``); the expert count is ``num_experts``."""

    model_types = ("beam",)
    family = "Beam"
    num_experts_key = "num_experts"
    shared_attrs = ()
    dense_layers_doc = "`mlp_layer_types` = dense"
    notes_doc = "`routed_scaling_factor` applied by the block after the experts (folded into the weights)"

    def routed_output_scale(self, block: nn.Module) -> float:
        """The block's ``routed_scaling_factor``."""
        return float(block.routed_scaling_factor)
