"""DeepSeek-V2 / V2-Lite / V2.5: softmax router, ``greedy`` or ``group_limited_greedy`` top-k,
weights never renormalised (the router ignores ``norm_topk_prob``) and scaled by
``routed_scaling_factor``; shared experts; the first ``first_k_dense_replace`` layers are dense."""

from __future__ import annotations

from typing import Any

from pipeline.errors import PipelineError
from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import GroupLimitedSoftmax, RoutingRule, SoftmaxTopK


@register
class DeepseekV2Adapter(MoEAdapter):
    """DeepSeek-V2 family (``deepseek_v2``).

    Group-limited routing picks the ``topk_group`` best of ``n_group`` contiguous groups of
    experts. A model keeping ``r`` experts keeps that structure (groups of ``r / n_group``
    consecutive kept experts) when ``r`` is divisible by ``n_group`` and the allowed groups still
    hold ``top_k`` experts; otherwise its config switches to plain ``greedy`` top-k
    (``n_group = topk_group = 1``). Candidates are scored with the pruned config's rule, so the
    search always scores what the exported model runs.
    """

    model_types = ("deepseek_v2",)
    family = "DeepSeek-V2"
    num_experts_key = "n_routed_experts"
    shared_attrs = ("shared_experts",)
    router_fp32 = True
    routing_doc = "softmax, top-k (`greedy`) or group-limited top-k (`group_limited_greedy`), x `routed_scaling_factor`"
    renormalized_doc = "no (`norm_topk_prob` is ignored by the router)"
    dense_layers_doc = "first `first_k_dense_replace`"
    notes_doc = "group-limited routing falls back to greedy when r is not divisible by `n_group`"

    def routing_rule(self, config: Any) -> RoutingRule:
        """The rule selected by ``topk_method``."""
        text = self.text_config(config)
        k, scale = self.top_k(config), float(text.routed_scaling_factor)
        if text.topk_method == "greedy":
            return SoftmaxTopK(top_k=k, renormalize=False, scale=scale)
        if text.topk_method == "group_limited_greedy":
            return GroupLimitedSoftmax(top_k=k, n_group=int(text.n_group), topk_group=int(text.topk_group), scale=scale)
        raise PipelineError(
            f"DeepSeek-V2 topk_method {text.topk_method!r} is not supported (greedy, group_limited_greedy)"
        )

    def config_updates(self, config: Any, r: int) -> dict[str, Any]:
        """``n_routed_experts = r``; greedy routing when the groups do not survive pruning."""
        updates: dict[str, Any] = {self.num_experts_key: r}
        text = self.text_config(config)
        if text.topk_method == "group_limited_greedy":
            n_group, topk_group = int(text.n_group), int(text.topk_group)
            if r % n_group != 0 or topk_group * (r // n_group) < self.top_k(config):
                updates.update(topk_method="greedy", n_group=1, topk_group=1)
        return updates
