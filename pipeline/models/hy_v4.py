"""Hunyuan v4 (``hy_v4``): DeepSeek-V3's sigmoid, bias-corrected, group-limited router, shared
experts, dense layers from ``mlp_layer_types`` (see :mod:`pipeline.models.deepseek_v3`)."""

from __future__ import annotations

from pipeline.models.deepseek_v3 import SigmoidGroupRouterAdapter
from pipeline.models.registry import register


@register
class HYV4Adapter(SigmoidGroupRouterAdapter):
    """Tencent Hunyuan v4 (``hy_v4``)."""

    model_types = ("hy_v4",)
    family = "Hunyuan v4"
    dense_layers_doc = "`mlp_layer_types` = dense"
