"""GLM-4.5 / GLM-4.6 (``glm4_moe``): DeepSeek-V3's sigmoid, bias-corrected, group-limited router,
shared experts and dense first layers (see :mod:`pipeline.models.deepseek_v3`)."""

from __future__ import annotations

from pipeline.models.deepseek_v3 import SigmoidGroupRouterAdapter
from pipeline.models.registry import register


@register
class Glm4MoeAdapter(SigmoidGroupRouterAdapter):
    """GLM-4.5, GLM-4.5-Air, GLM-4.6 (``glm4_moe``)."""

    model_types = ("glm4_moe",)
    family = "GLM-4.5 / 4.6 MoE"
