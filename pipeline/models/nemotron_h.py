"""Nemotron-H MoE (``nemotron_h``, e.g. Nemotron-3-Nano-30B-A3B): hybrid Mamba-2 / attention / MoE
layers; DeepSeek-V3's sigmoid, bias-corrected router; non-gated (ReLU^2) experts; a shared expert;
optionally a latent projection around the routed experts (``moe_latent_size``).

With a latent projection the block computes ``fc2(sum_i w_i E_i(fc1 x)) + shared(x)``. ``fc2`` is
linear, so the adapter's expert outputs are ``W_fc2 E_i(fc1 x)`` and ``fc2``'s bias (if any) is
part of the shared output; the decomposition is exact up to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.models.deepseek_v3 import SigmoidGroupRouterAdapter
from pipeline.models.registry import register


@register
class NemotronHAdapter(SigmoidGroupRouterAdapter):
    """NVIDIA Nemotron-H hybrids with MoE layers (``nemotron_h``); the layer's block is ``mixer``."""

    model_types = ("nemotron_h",)
    family = "Nemotron-H (MoE)"
    mlp_attr = "mixer"
    eager_handles_sentinel = False
    dense_layers_doc = "Mamba / attention / MLP blocks (`layers_block_type`)"
    notes_doc = "non-gated experts; latent projection folded into expert outputs"

    def expert_outputs(self, block: nn.Module, x: torch.Tensor, experts: Sequence[int] | None = None) -> torch.Tensor:
        """``W_fc2 E_i(fc1 x)`` (``E_i(x)`` without a latent projection): ``[T, m, d]``."""
        latent = block.fc1_latent_proj(x)
        out = self.experts_forward_each(block.experts, latent, experts, self.block_num_experts(block))
        fc2 = block.fc2_latent_proj
        return out if isinstance(fc2, nn.Identity) else nn.functional.linear(out, fc2.weight)

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert, plus ``fc2``'s bias when the latent projection has one."""
        out = block.shared_experts(x)
        bias = getattr(block.fc2_latent_proj, "bias", None)
        return out if bias is None else out + bias
