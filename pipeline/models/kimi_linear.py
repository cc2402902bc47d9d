"""Kimi Linear (``kimi_linear``): DeepSeek-V3's router and shared experts (see
:mod:`pipeline.models.deepseek_v3`) under hybrid KDA linear / full attention."""

from __future__ import annotations

from pipeline.models.deepseek_v3 import SigmoidGroupRouterAdapter
from pipeline.models.registry import register


@register
class KimiLinearAdapter(SigmoidGroupRouterAdapter):
    """Moonshot Kimi-Linear (``kimi_linear``); the expert count is ``num_local_experts``."""

    model_types = ("kimi_linear",)
    family = "Kimi Linear"
    num_experts_key = "num_local_experts"
    dense_layers_doc = "`mlp_layer_types` = dense"
    notes_doc = "linear-attention layers are untouched"
