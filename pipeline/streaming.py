"""The one layer-by-layer loop: catch the decoder layers' inputs, then run one layer at a time.

Peak memory is one decoder layer's weights on the compute device plus one set of hidden states,
whatever the depth of the model. Consumers iterate over :class:`LayerStep` objects: they read the
MoE block's input, may replace the block (progressive pruning), and the stream feeds the layer's
outputs to the next layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.models.base import MoEAdapter
from pipeline.offload import layer_source
from pipeline.runtime import release_freed_memory


class _Stop(Exception):
    """Raised by the last recording layer to end the capture forward pass early."""


@dataclass
class CapturedInputs:
    """Decoder-layer inputs of every micro-batch, and the keyword arguments each layer receives."""

    hidden: list[torch.Tensor]
    layer_kwargs: list[list[dict[str, Any]]]  # [layer][batch]


def _move_non_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer of ``model`` that is not inside ``layers`` to ``device``."""
    layer_ids = {id(m) for m in layers.modules()}
    for module in model.modules():
        if id(module) in layer_ids:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device != device:
                param.data = param.data.to(device)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.device != device:
                module._buffers[name] = buf.to(device)


@torch.no_grad()
def capture_inputs(
    model: nn.Module, adapter: MoEAdapter, input_ids: torch.Tensor, batch_size: int, device: torch.device
) -> CapturedInputs:
    """Run the model's embedding and mask code only, recording what each decoder layer would get.

    The decoder layers are replaced by recorders for the duration, so no layer weight is touched.
    """
    layers = adapter.decoder_layers(model)
    n_layers = len(layers)
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = [[] for _ in range(n_layers)]
    originals: list[Any] = []

    def recorder(i: int) -> Any:
        def forward(hidden_states: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
            if args:
                raise RuntimeError("decoder layers are expected to take keyword arguments after hidden_states")
            if i == 0:
                hidden.append(hidden_states)
            kwargs[i].append({k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")})
            if i == n_layers - 1:
                raise _Stop
            return hidden_states

        return forward

    _move_non_layers(model, layers, device)
    try:
        for i, layer in enumerate(layers):
            originals.append(layer.__dict__.get("forward"))
            layer.forward = recorder(i)
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            with contextlib.suppress(_Stop):
                model(input_ids=batch, use_cache=False)
    finally:
        for layer, orig in zip(layers, originals, strict=True):
            if orig is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = orig
    return CapturedInputs(hidden=hidden, layer_kwargs=kwargs)


@contextlib.contextmanager
def layer_on_device(
    model: nn.Module, layer_index: int, layer: nn.Module, device: torch.device, offload_device: torch.device | None = None
) -> Iterator[nn.Module]:
    """Decoder layer ``layer_index`` of ``model`` on ``device`` for the duration of the block.

    A model loaded with layers offloaded to its checkpoint (``pipeline.offload``) has the layer's
    weights read from disk onto ``device`` and dropped afterwards; any other model has the layer
    moved to ``device`` and back to ``offload_device`` (default: where it was).
    """
    source = layer_source(model)
    if source is not None:
        source.load(layer_index, device)
        try:
            yield layer
        finally:
            source.release(layer_index)
        return
    home = offload_device or next(layer.parameters()).device
    layer.to(device)
    try:
        yield layer
    finally:
        layer.to(home)


@dataclass
class LayerStep:
    """One decoder layer during streaming."""

    index: int
    layer: nn.Module
    block: nn.Module | None
    hidden_in: list[torch.Tensor]
    moe_input: list[torch.Tensor] = field(default_factory=list)  # per micro-batch [B, L, d]
    modified: bool = False

    def moe_tokens(self) -> torch.Tensor:
        """The MoE block's input on every calibration token, ``[N * L, d]``."""
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in self.moe_input])

    def replace_block(self, adapter: MoEAdapter, block: nn.Module) -> None:
        """Swap in a new MoE block; the stream recomputes this layer's outputs with it."""
        adapter.set_moe_block(self.layer, block)
        self.block = block
        self.modified = True


def _run_layer(
    layer: nn.Module, block: nn.Module | None, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]], capture: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    outs: list[torch.Tensor] = []
    captured: list[torch.Tensor] = []
    handle = None
    if capture and block is not None:

        def pre_hook(_m: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
            x = args[0] if args else kw["hidden_states"]
            captured.append(x.detach())

        handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for h, kw in zip(hidden, kwargs, strict=True):
            out = layer(h, **kw)
            outs.append(out[0] if isinstance(out, tuple) else out)
    finally:
        if handle is not None:
            handle.remove()
    return outs, captured


@torch.no_grad()
def stream_layers(
    model: nn.Module,
    adapter: MoEAdapter,
    input_ids: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    start_layer: int = 0,
    start_hidden: list[torch.Tensor] | None = None,
    offload_device: torch.device | None = None,
    progress: bool = True,
    desc: str = "layers",
) -> Iterator[LayerStep]:
    """Yield each decoder layer with its MoE block's input on the calibration tokens.

    The model's weights stay on ``offload_device`` (default: where they are) except for the
    layer being processed, which is moved to ``device`` (or, for a model loaded with
    ``pipeline.offload``, read from the checkpoint onto ``device`` and dropped after its step). ``start_layer`` and ``start_hidden``
    resume a stream from saved decoder-layer inputs.
    """
    layers = adapter.decoder_layers(model)
    captured = capture_inputs(model, adapter, input_ids, batch_size, device)
    hidden = captured.hidden if start_hidden is None else [h.to(device) for h in start_hidden]
    if len(hidden) != len(captured.hidden):
        raise ValueError("start_hidden must have one tensor per micro-batch")
    captured.hidden = []  # drop this reference so layer 0's inputs are freed once the stream moves on
    tokens = int(input_ids.numel())
    bar = tqdm(range(start_layer, len(layers)), desc=desc, unit="layer", disable=not progress, leave=False)
    for i in bar:
        layer = layers[i]
        with layer_on_device(model, i, layer, device, offload_device):
            block = adapter.moe_block(layer)
            outs, moe_in = _run_layer(layer, block, hidden, captured.layer_kwargs[i], capture=True)
            step = LayerStep(index=i, layer=layer, block=block, hidden_in=hidden, moe_input=moe_in)
            yield step
            if step.modified:
                outs, _ = _run_layer(layer, step.block, hidden, captured.layer_kwargs[i], capture=False)
        hidden = outs
        del step, moe_in  # free this layer's inputs before the next layer runs
        release_freed_memory()
        rate = bar.format_dict.get("rate")
        if rate:
            bar.set_postfix(tok_s=f"{tokens * rate:,.0f}")
    bar.close()
