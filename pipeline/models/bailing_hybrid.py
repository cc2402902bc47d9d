"""Bailing hybrid / Ring-linear (``bailing_hybrid``): DeepSeek-V3's router and shared experts (see
:mod:`pipeline.models.deepseek_v3`) under hybrid linear / full attention."""

from __future__ import annotations

from pipeline.models.deepseek_v3 import SigmoidGroupRouterAdapter
from pipeline.models.registry import register


@register
class BailingHybridAdapter(SigmoidGroupRouterAdapter):
    """inclusionAI Bailing hybrid models (``bailing_hybrid``); the expert count is ``num_local_experts``."""

    model_types = ("bailing_hybrid",)
    family = "Bailing hybrid (Ring/Ling linear)"
    num_experts_key = "num_local_experts"
    dense_layers_doc = "`mlp_layer_types` = dense"
    notes_doc = "linear-attention layers are untouched"
