"""MiMo-V2-Flash (``mimo_v2_flash``): DeepSeek-V3's sigmoid, bias-corrected, group-limited router
without shared experts; dense layers from ``mlp_layer_types`` (see :mod:`pipeline.models.deepseek_v3`)."""

from __future__ import annotations

from pipeline.models.deepseek_v3 import SigmoidGroupRouterAdapter
from pipeline.models.registry import register


@register
class MiMoV2FlashAdapter(SigmoidGroupRouterAdapter):
    """Xiaomi MiMo-V2-Flash (``mimo_v2_flash``)."""

    model_types = ("mimo_v2_flash",)
    family = "MiMo-V2-Flash"
    shared_attrs = ()
    dense_layers_doc = "`mlp_layer_types` = dense"
