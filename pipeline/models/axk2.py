"""A.X K2 (``axk2``): DeepSeek-V3's router (groups optional: ``n_group`` may be None) and shared
experts (see :mod:`pipeline.models.deepseek_v3`), except that experts outside the chosen groups get
choice score 0 (not -inf); dense layers from ``mlp_layer_types``; the gated norms around the block
are outside it and untouched."""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.models.deepseek_v3 import SigmoidGroupRouterAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule


@register
class AXK2Adapter(SigmoidGroupRouterAdapter):
    """SK Telecom A.X K2 (``axk2``)."""

    model_types = ("axk2",)
    family = "A.X K2"
    dense_layers_doc = "`mlp_layer_types` = dense"

    notes_doc = "experts outside the chosen groups score 0, not -inf"

    def routing_rule(self, config: Any) -> RoutingRule:
        """The V3 rule with masked groups scored 0."""
        return dataclasses.replace(super().routing_rule(config), masked_value=0.0)
