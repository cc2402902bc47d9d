"""EXAONE MoE (``exaone_moe``): DeepSeek-V3's sigmoid, bias-corrected, group-limited router,
shared experts, dense layers from ``mlp_layer_types`` (see :mod:`pipeline.models.deepseek_v3`)."""

from __future__ import annotations

from pipeline.models.deepseek_v3 import SigmoidGroupRouterAdapter
from pipeline.models.registry import register


@register
class ExaoneMoeAdapter(SigmoidGroupRouterAdapter):
    """LG EXAONE MoE (``exaone_moe``); the expert count is ``num_experts``."""

    model_types = ("exaone_moe",)
    family = "EXAONE MoE"
    num_experts_key = "num_experts"
    dense_layers_doc = "`mlp_layer_types` = dense"
