"""Granite MoE with sliding-window attention (``granitemoe_swa``): Granite MoE's router with an
optional shared MLP beside the block (see :mod:`pipeline.models.granitemoe`)."""

from __future__ import annotations

from pipeline.models.granitemoe import GraniteMoeSharedAdapter
from pipeline.models.registry import register


@register
class GraniteMoeSWAAdapter(GraniteMoeSharedAdapter):
    """Granite MoE SWA (``granitemoe_swa``)."""

    model_types = ("granitemoe_swa",)
    family = "Granite MoE SWA"
