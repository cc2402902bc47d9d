"""dots.llm1 (``dots1``): DeepSeek-V3's sigmoid, bias-corrected, group-limited router, shared
experts and dense first layers (see :mod:`pipeline.models.deepseek_v3`)."""

from __future__ import annotations

from pipeline.models.deepseek_v3 import SigmoidGroupRouterAdapter
from pipeline.models.registry import register


@register
class Dots1Adapter(SigmoidGroupRouterAdapter):
    """rednote-hilab dots.llm1 (``dots1``)."""

    model_types = ("dots1",)
    family = "dots.llm1"
