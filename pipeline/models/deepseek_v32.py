"""DeepSeek-V3.2 (``deepseek_v32``): DeepSeek-V3's router (see :mod:`pipeline.models.deepseek_v3`)
with sparse (indexer) attention, which pruning leaves untouched; dense layers from ``mlp_layer_types``."""

from __future__ import annotations

from pipeline.models.deepseek_v3 import SigmoidGroupRouterAdapter
from pipeline.models.registry import register


@register
class DeepseekV32Adapter(SigmoidGroupRouterAdapter):
    """DeepSeek-V3.2-Exp (``deepseek_v32``)."""

    model_types = ("deepseek_v32",)
    family = "DeepSeek-V3.2"
    dense_layers_doc = "`mlp_layer_types` = dense (first `first_k_dense_replace`)"
