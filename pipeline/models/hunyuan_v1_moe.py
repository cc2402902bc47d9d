"""Hunyuan-A13B (``hunyuan_v1_moe``): softmax top-k (``moe_topk``), renormalised; a shared MLP on
every token; the router matrix is ``gate.wg`` (kept in float32 by the model)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SoftmaxTopK


@register
class HunYuanMoeV1Adapter(MoEAdapter):
    """Tencent Hunyuan-A13B (``hunyuan_v1_moe``)."""

    model_types = ("hunyuan_v1_moe",)
    family = "Hunyuan-A13B"
    num_experts_key = "num_experts"
    top_k_key = "moe_topk"
    router_expert_tensors = ("wg.weight",)
    shared_attrs = ("shared_mlp",)
    routing_doc = "softmax, top-k (`moe_topk`)"
    renormalized_doc = "yes"
    notes_doc = "router `gate.wg` (float32 in the checkpoint)"

    def top_k(self, config: Any) -> int:
        """``moe_topk``, which may be a per-layer list (then all entries must agree)."""
        value = getattr(self.text_config(config), self.top_k_key)
        if isinstance(value, list | tuple):
            if len(set(value)) != 1:
                raise PipelineError(f"Hunyuan moe_topk differs between layers ({value}); not supported")
            value = value[0]
        return int(value)

    def top_k_updates(self, config: Any, k: int) -> dict[str, Any]:
        """``moe_topk = k`` (every layer's entry when it is a per-layer list)."""
        value = getattr(self.text_config(config), self.top_k_key)
        updates = super().top_k_updates(config, k)
        return {self.top_k_key: [k] * len(value)} if isinstance(value, list | tuple) else updates

    def routing_rule(self, config: Any) -> RoutingRule:
        """Softmax over the experts, top-k, renormalised."""
        return SoftmaxTopK(top_k=self.top_k(config), renormalize=True)

    def router_weight(self, block: nn.Module) -> torch.Tensor:
        """``gate.wg.weight`` ``[n, d]``."""
        return block.gate.wg.weight

    def router_bias(self, block: nn.Module) -> torch.Tensor | None:
        """The router has no bias."""
        return None

    def new_block(self, block: nn.Module, config: Any, layer_idx: int) -> nn.Module:
        """The block takes its layer index (for per-layer ``moe_topk``)."""
        with torch.device("meta"):
            return type(block)(self.text_config(config), layer_idx=layer_idx)
