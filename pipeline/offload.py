"""Decoder-layer weights read from the checkpoint only while that layer is processed.

A model larger than the machine's RAM can still be calibrated and searched one layer at a time:
:func:`load_layer_offloaded` builds the model skeleton on the meta device (no memory), loads the
non-layer modules (embeddings, final norm, head, rotary buffers) from the checkpoint, and leaves
every decoder layer on the meta device. :class:`CheckpointLayers`, attached to the model, then
materialises one layer's weights from the safetensors files directly on the compute device
(``load``) and drops them again (``release``). :func:`pipeline.streaming.layer_on_device` is the
one place the pipeline brings a layer to its device: it uses the attached loader when there is one
and moves the layer otherwise, so the same code serves both.

Checkpoint tensors are renamed and fused exactly as ``from_pretrained`` does (transformers'
weight-conversion mapping, e.g. Mixtral's per-expert ``block_sparse_moe.experts.{j}.w1.weight`` into
the fused ``mlp.experts.gate_up_proj``): each layer's checkpoint keys are found by renaming every key
with that mapping, and the layer is loaded with transformers' own ``convert_and_load_state_dict_in_model``.
Buffers absent from the checkpoint (non-persistent ones such as rotary ``inv_freq``) are recomputed
by the model's ``_init_weights``, again as ``from_pretrained`` does. What cannot be handled this way
(``.bin`` weights, remote code, keys that do not map onto the layers) is reported by
:class:`OffloadUnsupported`, and :func:`pipeline.models.loading.load_model` falls back to loading
the whole model with a log line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.runtime import release_freed_memory

log = logging.getLogger(__name__)

#: ``runtime.offload: auto`` streams layer weights when the checkpoint exceeds this fraction of available RAM.
AUTO_RAM_FRACTION = 0.5
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_LOADERS: weakref.WeakKeyDictionary[nn.Module, CheckpointLayers] = weakref.WeakKeyDictionary()


class OffloadUnsupported(Exception):
    """The checkpoint or model cannot be loaded layer by layer (the caller loads it whole)."""


def layer_source(model: nn.Module) -> CheckpointLayers | None:
    """The per-layer weight loader attached to ``model``, or None for an ordinary model."""
    return _LOADERS.get(model)


def detach_layer_source(model: nn.Module) -> None:
    """Forget ``model``'s per-layer loader (once every layer is materialised for good, e.g. after export)."""
    _LOADERS.pop(model, None)


def weight_files(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """``{file name: [tensor names]}`` of a checkpoint's safetensors weights (index json or one file)."""
    root = Path(path)
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            files.setdefault(file, []).append(key)
        return files
    single = root / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as fh:
            return {SINGLE_FILE: list(fh.keys())}
    raise OffloadUnsupported(f"{root} has no safetensors weights ({INDEX_FILE} or {SINGLE_FILE})")


def checkpoint_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of a checkpoint's weight files (safetensors or bin)."""
    root = Path(path)
    return sum(f.stat().st_size for f in [*root.glob("*.safetensors"), *root.glob("*.bin")])


def available_ram_bytes() -> int:
    """Memory the OS can give this process now (psutil's ``available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def should_offload(mode: str, path: str | os.PathLike[str], dtype: torch.dtype) -> bool:
    """Whether ``runtime.offload`` = ``mode`` means loading layers from the checkpoint on demand.

    ``auto``: when the weights, at ``dtype``, would take more than :data:`AUTO_RAM_FRACTION` of the RAM
    available now (the checkpoint's size is scaled from its stored dtype, read from config.json).
    """
    if mode in ("none", "layers"):
        return mode == "layers"
    if mode != "auto":
        raise ValueError(f"unknown offload mode {mode!r}")
    size = checkpoint_bytes(path)
    stored = _stored_element_size(path)
    if stored:
        size = size * torch.empty((), dtype=dtype).element_size() // stored
    return size > AUTO_RAM_FRACTION * available_ram_bytes()


def _stored_element_size(path: str | os.PathLike[str]) -> int | None:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = cfg.get("text_config") or cfg
    name = text.get("dtype") or text.get("torch_dtype") or cfg.get("dtype") or cfg.get("torch_dtype")
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2}
    return sizes.get(str(name).removeprefix("torch."))


# -- the skeleton -----------------------------------------------------------------------------------
def _model_class(config: Any) -> type:
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _get_model_class

    try:
        return _get_model_class(config, AutoModelForCausalLM._model_mapping)
    except (KeyError, ValueError) as exc:
        raise OffloadUnsupported(f"no built-in causal-LM class for model type {config.model_type!r}") from exc


def _skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device, built the way ``from_pretrained`` builds it before loading."""
    from transformers.utils.generic import ContextManagers

    cls = _model_class(config)
    with ContextManagers(cls.get_init_context(dtype, False, False, None)):
        model = cls(config)
    return model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-call "Loading weights" progress bar from transformers."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), leaf


def _init_owner(model: nn.Module, module_name: str) -> Any:
    """The ``PreTrainedModel`` whose ``_init_weights`` initialises the module ``module_name``."""
    from transformers import PreTrainedModel

    best, best_len = model, -1
    for name, sub in model.named_modules():
        if isinstance(sub, PreTrainedModel) and (name == "" or module_name == name or module_name.startswith(name + ".")):
            if len(name) > best_len:
                best, best_len = sub, len(name)
    return best


@torch.no_grad()
def _materialise_buffers(model: nn.Module, modules: list[tuple[str, nn.Module]], device: torch.device) -> None:
    """Give every meta buffer of ``modules`` (own buffers only) storage on ``device``; ``_init_weights`` fills it.

    This is what ``from_pretrained`` does for buffers the checkpoint does not hold (rotary
    ``inv_freq`` and other non-persistent buffers): allocate, then run the model's initialisation,
    which leaves everything already loaded alone.
    """
    from transformers import initialization as hf_init

    owners: list[tuple[str, nn.Module]] = []
    for module_name, module in modules:
        meta = [(leaf, buf) for leaf, buf in module.named_buffers(recurse=False) if buf is not None and buf.is_meta]
        for leaf, buf in meta:
            persistent = leaf not in module._non_persistent_buffers_set
            module.register_buffer(leaf, torch.empty_like(buf, device=device), persistent=persistent)
        if meta:
            owners.append((module_name, module))
    if owners:
        with hf_init.guard_torch_init_functions():
            for module_name, module in owners:
                _init_owner(model, module_name)._init_weights(module)


# -- the loader -------------------------------------------------------------------------------------
class CheckpointLayers:
    """Loads one decoder layer's weights from a checkpoint's safetensors files at a time.

    Built by :func:`load_layer_offloaded`; ``load(i, device)`` materialises layer ``i`` on ``device``
    (tensors converted as ``from_pretrained`` converts them, in the model's dtype), ``release(i)``
    returns it to the meta device, freeing its memory.
    """

    def __init__(self, model: nn.Module, path: Path, dtype: torch.dtype, layers: nn.ModuleList, layer_prefixes: list[str]) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.model = model
        self.path = path
        self.dtype = dtype
        self.layers = layers
        self.prefixes = layer_prefixes
        self.mapping = get_model_conversion_mapping(model)
        self.dtype_plan = model._get_dtype_plan(dtype)
        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        meta_state = model.state_dict()
        # checkpoint keys of each layer ({file: [keys]}) and of the rest of the model
        self.layer_keys: list[dict[str, list[str]]] = [{} for _ in layers]
        self.other_keys: dict[str, list[str]] = {}
        by_prefix = {p + ".": i for i, p in enumerate(layer_prefixes)}
        for file, keys in weight_files(path).items():
            for key in keys:
                target, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
                layer = next((i for p, i in by_prefix.items() if target.startswith(p)), None)
                if layer is None:
                    self.other_keys.setdefault(file, []).append(key)
                else:
                    self.layer_keys[layer].setdefault(file, []).append(key)
        missing = [i for i, keys in enumerate(self.layer_keys) if not keys]
        if missing:
            raise OffloadUnsupported(f"no checkpoint tensors map onto decoder layers {missing[:5]}")
        self.loaded: set[int] = set()

    def _load_keys(self, files: dict[str, list[str]], device: torch.device) -> Any:
        from safetensors import safe_open
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        config = LoadStateDictConfig(
            device_map={"": str(device)}, dtype=self.dtype, dtype_plan=self.dtype_plan, weight_mapping=self.mapping
        )
        with contextlib.ExitStack() as stack:
            subset: dict[str, Any] = {}
            for file, keys in files.items():
                handle = stack.enter_context(safe_open(str(self.path / file), framework="pt", device="cpu"))
                subset.update({k: handle.get_slice(k) for k in keys})
            with _quiet_transformers():
                info, _ = convert_and_load_state_dict_in_model(self.model, subset, config)
            del subset
        return info

    @torch.no_grad()
    def load_rest(self) -> None:
        """Load every tensor outside the decoder layers on the CPU, tie weights, fill missing buffers."""
        info = self._load_keys(self.other_keys, torch.device("cpu"))
        problems = [*sorted(info.mismatched_keys)[:3], *list(info.conversion_errors)[:3]]
        if problems:
            raise OffloadUnsupported(f"cannot load the non-layer weights one by one: {problems}")
        self.model.tie_weights()
        layer_ids = {id(m) for m in self.layers.modules()}
        rest: list[tuple[str, nn.Module]] = []
        for name, module in self.model.named_modules():
            if id(module) in layer_ids:
                continue
            for pname, param in module.named_parameters(recurse=False):
                if param.is_meta:
                    raise OffloadUnsupported(f"parameter {name}.{pname} is not in the checkpoint")
            rest.append((name, module))
        _materialise_buffers(self.model, rest, torch.device("cpu"))

    @torch.no_grad()
    def load(self, index: int, device: torch.device | str) -> nn.Module:
        """Materialise decoder layer ``index`` on ``device`` from the checkpoint; returns the layer."""
        device = torch.device(device)
        layer = self.layers[index]
        info = self._load_keys(self.layer_keys[index], device)
        if info.mismatched_keys or info.conversion_errors:
            raise OffloadUnsupported(
                f"layer {index}: checkpoint tensors do not fit the model "
                f"({sorted(info.mismatched_keys)[:2] or list(info.conversion_errors)[:2]})"
            )
        for name, param in layer.named_parameters():
            if param.is_meta:
                raise OffloadUnsupported(f"layer {index}: parameter {name} is not in the checkpoint")
        prefix = self.prefixes[index]
        _materialise_buffers(self.model, [(f"{prefix}.{n}" if n else prefix, m) for n, m in layer.named_modules()], device)
        self.loaded.add(index)
        return layer

    @torch.no_grad()
    def release(self, index: int) -> None:
        """Return layer ``index`` to the meta device (its weights are freed)."""
        self.layers[index].to_empty(device="meta")
        self.loaded.discard(index)
        release_freed_memory()


def load_layer_offloaded(path: str | os.PathLike[str], config: Any, dtype: torch.dtype) -> nn.Module:
    """The model at ``path`` with its decoder layers on the meta device and a :class:`CheckpointLayers` attached.

    Everything outside the decoder layers is loaded on the CPU. Layer 0 is loaded once on the CPU and
    released again, so a checkpoint this path cannot handle fails here (:class:`OffloadUnsupported`),
    not in the middle of a run.
    """
    from pipeline.models.registry import get_adapter

    if getattr(config, "auto_map", None):
        raise OffloadUnsupported("models with remote code are loaded whole")
    path = Path(path)
    adapter = get_adapter(config)
    try:
        model = _skeleton(config, dtype)
        layers = adapter.decoder_layers(model)
        ids = {id(layer): i for i, layer in enumerate(layers)}
        prefixes = [""] * len(layers)
        for name, module in model.named_modules():
            if id(module) in ids:
                prefixes[ids[id(module)]] = name
        loader = CheckpointLayers(model, path, dtype, layers, prefixes)
        loader.load_rest()
        loader.load(0, "cpu")
        loader.release(0)
    except (AttributeError, TypeError, KeyError, ValueError, RuntimeError, OSError) as exc:
        # transformers' loading internals changed, or a checkpoint they cannot take piecewise
        raise OffloadUnsupported(f"{type(exc).__name__}: {exc}") from exc
    model.eval()
    _LOADERS[model] = loader
    return model


__all__ = [
    "AUTO_RAM_FRACTION",
    "CheckpointLayers",
    "OffloadUnsupported",
    "available_ram_bytes",
    "checkpoint_bytes",
    "detach_layer_source",
    "layer_source",
    "load_layer_offloaded",
    "should_offload",
    "weight_files",
]
