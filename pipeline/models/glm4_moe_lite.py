"""GLM-4.7-Flash style ``glm4_moe_lite``: DeepSeek-V3's sigmoid, bias-corrected, group-limited
router with MLA attention; dense layers from ``mlp_layer_types`` (see :mod:`pipeline.models.deepseek_v3`)."""

from __future__ import annotations

from pipeline.models.deepseek_v3 import SigmoidGroupRouterAdapter
from pipeline.models.registry import register


@register
class Glm4MoeLiteAdapter(SigmoidGroupRouterAdapter):
    """GLM-4 MoE Lite (``glm4_moe_lite``)."""

    model_types = ("glm4_moe_lite",)
    family = "GLM-4 MoE Lite"
    dense_layers_doc = "`mlp_layer_types` = dense"
