"""Granite 4.0 hybrids (``granitemoehybrid``): Granite MoE's router (top-k logits, softmax over
them) with a shared MLP beside the block, under Mamba-2 / attention layers."""

from __future__ import annotations

from pipeline.models.granitemoe import GraniteMoeSharedAdapter
from pipeline.models.registry import register


@register
class GraniteMoeHybridAdapter(GraniteMoeSharedAdapter):
    """IBM Granite-4.0 (``granitemoehybrid``) with experts; dense variants have no MoE layer."""

    model_types = ("granitemoehybrid",)
    family = "Granite 4.0 hybrid MoE"
    notes_doc = "Mamba layers and the layer's `shared_mlp` are untouched"
