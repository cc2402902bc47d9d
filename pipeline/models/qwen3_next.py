"""Qwen3-Next (``qwen3_next``): Qwen2-MoE's router and sigmoid-gated shared expert (see
:mod:`pipeline.models.qwen2_moe`) under hybrid Gated-DeltaNet / full attention."""

from __future__ import annotations

from pipeline.models.qwen2_moe import Qwen2MoeAdapter
from pipeline.models.registry import register


@register
class Qwen3NextAdapter(Qwen2MoeAdapter):
    """Qwen3-Next-80B-A3B (``qwen3_next``)."""

    model_types = ("qwen3_next",)
    family = "Qwen3-Next"
    renormalized_doc = "`norm_topk_prob` (true in released models)"
    notes_doc = "linear-attention (Gated DeltaNet) layers are untouched"
