"""GLM MoE with DeepSeek sparse attention (``glm_moe_dsa``): DeepSeek-V3's router, shared experts,
dense layers from ``mlp_layer_types`` (see :mod:`pipeline.models.deepseek_v3`)."""

from __future__ import annotations

from pipeline.models.deepseek_v3 import SigmoidGroupRouterAdapter
from pipeline.models.registry import register


@register
class GlmMoeDsaAdapter(SigmoidGroupRouterAdapter):
    """GLM-5-style MoE with sparse attention (``glm_moe_dsa``)."""

    model_types = ("glm_moe_dsa",)
    family = "GLM MoE DSA"
    dense_layers_doc = "`mlp_layer_types` = dense"
