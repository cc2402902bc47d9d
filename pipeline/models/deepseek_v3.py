"""DeepSeek-V3 / R1 and the families that copy its router (GLM-4.5/4.6 MoE, dots.llm1, ...):
sigmoid scores, experts chosen by score + ``e_score_correction_bias`` inside the best
``topk_group`` of ``n_group`` groups, weights = sigmoid scores of the chosen experts, renormalised
with ``norm_topk_prob``, times ``routed_scaling_factor``; shared experts; dense first layers."""

from __future__ import annotations

from typing import Any

from pipeline.errors import PipelineError
from pipeline.models.base import MoEAdapter
from pipeline.models.registry import register
from pipeline.models.routing import RoutingRule, SigmoidBiasTopK


class SigmoidGroupRouterAdapter(MoEAdapter):
    """Shared logic of DeepSeek-V3-style routers (``gate`` with ``e_score_correction_bias``).

    The selection bias is sliced with the router rows on export. Group-limited selection
    (``n_group`` contiguous groups, group score = sum of its two best biased scores) survives
    pruning to ``r`` experts only when ``r`` is divisible by ``n_group``, every group keeps at
    least two experts and the ``topk_group`` allowed groups still hold ``top_k`` experts; otherwise
    the pruned config uses ``n_group = topk_group = 1`` (plain top-k of the biased scores), and the
    search scores candidates with that rule, which is what the exported model runs.
    """

    num_experts_key = "n_routed_experts"
    choice_bias_attr = "e_score_correction_bias"
    shared_attrs = ("shared_experts",)
    router_fp32 = True
    routing_doc = "sigmoid, bias-corrected group-limited top-k, x `routed_scaling_factor`"
    renormalized_doc = "`norm_topk_prob`"
    dense_layers_doc = "first `first_k_dense_replace`"
    notes_doc = "`e_score_correction_bias` sliced with the router; groups reset to 1 when r does not split evenly"

    def routing_rule(self, config: Any) -> RoutingRule:
        """Sigmoid scores, bias-corrected (group-limited) choice, optional renormalisation, scale."""
        text = self.text_config(config)
        return SigmoidBiasTopK(
            top_k=self.top_k(config),
            n_group=int(text.n_group or 1),
            topk_group=int(text.topk_group or 1),
            renormalize=bool(text.norm_topk_prob),
            scale=float(text.routed_scaling_factor),
        )

    def check_r(self, config: Any, r: int) -> None:
        """The router's group score needs at least two experts per group."""
        super().check_r(config, r)
        if r < 2:
            raise PipelineError(f"r={r}: a {self.family} router needs at least 2 experts per layer")

    def config_updates(self, config: Any, r: int) -> dict[str, Any]:
        """``n_routed_experts = r``; one group when the original groups cannot be kept."""
        updates: dict[str, Any] = {self.num_experts_key: r}
        text = self.text_config(config)
        n_group, topk_group = int(text.n_group or 1), int(text.topk_group or 1)
        per = r // n_group
        if n_group > 1 and (r % n_group != 0 or per < 2 or topk_group * per < self.top_k(config)):
            updates.update(n_group=1, topk_group=1)
        return updates


@register
class DeepseekV3Adapter(SigmoidGroupRouterAdapter):
    """DeepSeek-V3, V3.1, R1 and Kimi-K2-style checkpoints (``deepseek_v3``)."""

    model_types = ("deepseek_v3",)
    family = "DeepSeek-V3 / R1"
