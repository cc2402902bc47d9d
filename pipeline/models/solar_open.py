"""Solar Open (``solar_open``): DeepSeek-V3's sigmoid, bias-corrected, group-limited router and a
shared expert in every layer (see :mod:`pipeline.models.deepseek_v3`)."""

from __future__ import annotations

from pipeline.models.deepseek_v3 import SigmoidGroupRouterAdapter
from pipeline.models.registry import register


@register
class SolarOpenAdapter(SigmoidGroupRouterAdapter):
    """Upstage Solar Open (``solar_open``); every layer is MoE."""

    model_types = ("solar_open",)
    family = "Solar Open"
    dense_layers_doc = "none"
