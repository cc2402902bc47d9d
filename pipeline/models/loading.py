"""Resolving, fingerprinting and loading checkpoints, and the model manifest every stage reads."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.io import read_json, write_json
from pipeline.offload import INDEX_FILE, SINGLE_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelManifest:
    """Where the model is and the facts downstream stages check against (written by the model stage)."""

    source: str
    path: str
    revision: str | None
    model_type: str
    fingerprint: str
    num_hidden_layers: int
    moe_layers: list[int]
    num_experts: int
    top_k: int
    hidden_size: int
    max_position_embeddings: int | None
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the manifest as JSON, atomically."""
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelManifest:
        """Read a manifest written by :meth:`save`."""
        data = read_json(path, what="model manifest")
        try:
            return cls(**data)
        except TypeError as exc:
            raise PipelineError(f"model manifest {path} is malformed: {exc}") from None


def resolve_source(source: str, revision: str | None = None, key: str = "model.source") -> Path:
    """A local checkpoint directory for ``source``: a local path, or a hub id found in the HF cache.

    Nothing is downloaded; a hub id that is not cached is a one-line error.
    """
    local = Path(source).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise PipelineError(f"{key}: {local} has no config.json (not a Hugging Face checkpoint directory)")
        return local.resolve()
    if source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1):
        raise PipelineError(f"{key}: model path {source} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id=source, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, HFValidationError, OSError) as exc:
        raise PipelineError(
            f"{key}: {source!r} is neither a local directory nor in the Hugging Face cache, and downloads are "
            f"not possible offline; download it once (huggingface-cli download {source}) or give a local path"
        ) from exc
    return Path(path)


def _safetensors_header(path: Path) -> bytes:
    """The raw JSON header of a safetensors file; a file shorter than the header it declares is a one-line error."""
    on_disk = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise PipelineError(f"checkpoint file {path} is truncated: {on_disk} bytes, less than the 8-byte header length")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise PipelineError(f"checkpoint file {path} has a corrupt header (declared length {size} bytes)")
        if 8 + size > on_disk:
            raise PipelineError(
                f"checkpoint file {path} is truncated: its header alone is {8 + size} bytes, the file holds {on_disk}"
            )
        return fh.read(size)


def safetensors_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a safetensors file, from its header only.

    A header that is not valid, or tensor data that does not end exactly at the end of the file
    (a truncated or padded file), is a one-line error naming the file and both sizes.
    """
    path = Path(path)
    raw = _safetensors_header(path)
    try:
        header = json.loads(raw)
        header.pop("__metadata__", None)
        shapes = {name: tuple(int(d) for d in entry["shape"]) for name, entry in header.items()}
        data = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise PipelineError(f"checkpoint file {path} has a corrupt header ({type(exc).__name__}: {exc})") from None
    expected, on_disk = 8 + len(raw) + data, path.stat().st_size
    if on_disk != expected:
        state = "truncated" if on_disk < expected else "corrupt"
        raise PipelineError(
            f"checkpoint file {path} is {state}: its header describes {expected} bytes "
            f"({len(raw)}-byte header, {data} bytes of tensors), the file holds {on_disk}"
        )
    return shapes


_SAMPLE = 1 << 20


def checkpoint_fingerprint(path: str | os.PathLike[str]) -> str:
    """A short hash of a checkpoint's config, safetensors headers and sizes, and weight samples (cheap at any size)."""
    root = Path(path)
    digest = hashlib.sha256()
    config = root / "config.json"
    if not config.is_file():
        raise PipelineError(f"{root} has no config.json")
    cfg = json.loads(config.read_text())
    for volatile in ("transformers_version", "_name_or_path"):
        cfg.pop(volatile, None)
    digest.update(json.dumps(cfg, sort_keys=True).encode())
    for file in sorted(root.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(file.name.encode())
        digest.update(str(size).encode())
        digest.update(_safetensors_header(file))
        with open(file, "rb") as fh:  # weight samples: a retrained model of the same shape differs here
            for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                fh.seek(offset)
                digest.update(fh.read(_SAMPLE))
    return digest.hexdigest()[:16]


def load_config(path: str | os.PathLike[str], trust_remote_code: bool = False) -> Any:
    """The transformers config of a checkpoint directory."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise PipelineError(f"cannot read the model config in {path}: {exc}") from None


#: Config key of a checkpoint whose MoE layers keep different numbers of experts: ``{"<layer>": count}``.
#: Its expert-count key holds the largest count; plain ``from_pretrained`` cannot load it (docs/architecture.md).
COUNTS_KEY = "experts_per_layer"


def expert_counts(config: Any) -> dict[int, int] | None:
    """Experts each MoE layer keeps when the checkpoint's counts differ per layer, else None."""
    counts = getattr(config, COUNTS_KEY, None)
    if not counts:
        return None
    return {int(layer): int(count) for layer, count in counts.items()}


def share_config(model: nn.Module, own: Any, shared: Any) -> None:
    """Point every submodule of ``model`` holding config object ``own`` at ``shared`` instead."""
    for module in model.modules():
        if module.__dict__.get("config") is own:
            module.config = shared


def resize_moe_layers(model: nn.Module, counts: dict[int, int]) -> None:
    """Replace each MoE block whose count differs from the config's by an empty (meta) block of its count.

    The new blocks share the model's config object (so ``set_experts_implementation`` reaches them);
    their expert and router shapes come from the count they were built for.
    """
    from pipeline.models.registry import get_adapter

    config = model.config
    adapter = get_adapter(config)
    n = adapter.num_experts(config)
    text = adapter.text_config(config)
    layers = adapter.decoder_layers(model)
    built: dict[int, Any] = {}
    for i, count in sorted(counts.items()):
        block = adapter.moe_block(layers[i]) if i < len(layers) else None
        if block is None:
            raise PipelineError(f"{COUNTS_KEY}: layer {i} of the config has no MoE block")
        if count == n:
            continue
        pruned = built.setdefault(count, adapter.pruned_config(config, count))
        new = adapter.new_block(block, pruned, i)
        share_config(new, adapter.text_config(pruned), text)
        adapter.set_moe_block(layers[i], new)


def per_layer_model_class(base: type) -> type:
    """``base`` (a transformers model class) building each MoE layer with its own expert count.

    The subclass keeps ``base``'s name and module, so checkpoints it saves name the same
    architecture; ``from_pretrained`` on it loads a checkpoint with ``experts_per_layer``.
    """
    cached = _PER_LAYER_CLASSES.get(base)
    if cached is not None:
        return cached

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, config, *args, **kwargs)
        counts = expert_counts(config)
        if counts:
            resize_moe_layers(self, counts)

    cls = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__, "__qualname__": base.__qualname__})
    _PER_LAYER_CLASSES[base] = cls
    return cls


_PER_LAYER_CLASSES: dict[type, type] = {}


def causal_lm_class(config: Any) -> type:
    """The transformers causal-LM class of ``config``, made per-layer aware when its counts differ per layer."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _get_model_class

    base = _get_model_class(config, AutoModelForCausalLM._model_mapping)
    return per_layer_model_class(base) if expert_counts(config) else base


def load_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    experts_implementation: str | None = None,
    offload: str = "none",
    offload_folder: str | os.PathLike[str] | None = None,
    top_k: int | None = None,
) -> Any:
    """Load a causal LM from a local checkpoint directory, in eval mode.

    ``device_map`` (for example ``"auto"``) spreads a model larger than one device over GPUs and
    CPU with accelerate (``offload_folder`` holds weights a map sends to ``"disk"``); otherwise the
    whole model goes to ``device``. ``offload`` (``runtime.offload``): ``layers`` leaves the decoder
    layers in the checkpoint, to be read one at a time by the layer stream (``pipeline.offload``;
    everything else is loaded on the CPU), ``auto`` does so when the weights would not fit
    comfortably in RAM, ``none`` loads everything. A checkpoint that cannot be read layer by layer
    is loaded whole, with a log line saying why. ``top_k`` lowers the experts per token in the config
    before the model is built (static top-k reduction, the family's routing rule; the adapter's
    ``reduced_top_k_config``).

    A checkpoint whose MoE layers keep different numbers of experts (``experts_per_layer`` in its
    config, written by the export under ``search.allocation: global``) is built with each layer's
    own count (:func:`per_layer_model_class`) and is always loaded whole. This is the one call that
    loads such checkpoints; uniform ones are plain transformers checkpoints.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise PipelineError(f"model checkpoint {path} does not exist or has no config.json")
    if offload not in ("none", "layers", "auto"):
        raise PipelineError(f"runtime.offload: unknown mode {offload!r} (allowed: none, layers, auto)")
    per_layer = bool(expert_counts(load_config(path, trust_remote_code)))
    if per_layer and trust_remote_code and getattr(load_config(path, trust_remote_code), "auto_map", None):
        raise PipelineError(f"{path}: per-layer expert counts are not supported for models with remote code")
    if device_map is None and offload != "none" and top_k is None and not per_layer:
        from pipeline.offload import OffloadUnsupported, load_layer_offloaded, should_offload

        if should_offload(offload, path, dtype):
            try:
                model = load_layer_offloaded(path, load_config(path, trust_remote_code), dtype)
                if experts_implementation is not None:
                    model.set_experts_implementation(experts_implementation)
                log.info("runtime.offload %s: decoder layers stay in %s and are loaded one at a time", offload, path)
                return model
            except OffloadUnsupported as exc:
                log.warning("runtime.offload %s: loading the whole model instead (%s)", offload, exc)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    if top_k is not None:
        from pipeline.models import get_adapter

        config = load_config(path, trust_remote_code)
        kwargs["config"] = get_adapter(config).reduced_top_k_config(config, top_k)
    try:
        if per_layer:
            model = causal_lm_class(kwargs.get("config") or load_config(path, trust_remote_code)).from_pretrained(
                str(path), **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot load model from {path}: {exc}") from None
    if device_map is None:
        model.to(device)
    return model.eval()


def load_tokenizer(path: str | os.PathLike[str], trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with a checkpoint."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot load the tokenizer from {path}: {exc}") from None


#: The .bin counterparts of ``SINGLE_FILE`` and ``INDEX_FILE``: ``from_pretrained`` falls back to them without safetensors.
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"


def _index_shards(index: Path, key: str) -> dict[str, list[str]]:
    """``{shard file: [tensor names]}`` of a checkpoint index; its shard files must all exist."""
    weight_map = read_json(index, what="checkpoint index")
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise PipelineError(f"{key}: checkpoint index {index} has no weight_map")
    shards: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        shards.setdefault(str(file), []).append(name)
    missing = sorted(f for f in shards if not (index.parent / f).is_file())
    if missing:
        listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise PipelineError(
            f"{key}: checkpoint index {index} names {len(shards)} shard files, {len(missing)} of them missing "
            f"from {index.parent}: {listed}"
        )
    return shards


#: ``{tensor name: (file holding it, shape or None where unknown)}`` of a checkpoint's weights.
Tensors = dict[str, tuple[str, tuple[int, ...] | None]]


def _weight_tensors(root: Path, key: str) -> tuple[Tensors, str]:
    """The tensors of a checkpoint's weights, and the file that lists them (an index or the one weight file).

    Safetensors files are checked against their headers (every tensor the index assigns to a shard
    is in it; no file is truncated); .bin files are only checked to exist (reading them would mean
    unpickling). A checkpoint with none of the weight files ``from_pretrained`` looks for is an error.
    """
    if (root / INDEX_FILE).is_file():
        tensors: Tensors = {}
        for file, names in _index_shards(root / INDEX_FILE, key).items():
            try:
                shapes = safetensors_shapes(root / file)
            except PipelineError as exc:
                raise PipelineError(f"{key}: {exc}") from None
            absent = [n for n in names if n not in shapes]
            if absent:
                raise PipelineError(
                    f"{key}: checkpoint file {root / file} lacks {len(absent)} of the {len(names)} tensors "
                    f"{INDEX_FILE} assigns to it (e.g. {absent[0]})"
                )
            tensors.update({n: (file, shapes[n]) for n in names})
        return tensors, INDEX_FILE
    if (root / SINGLE_FILE).is_file():
        try:
            shapes = safetensors_shapes(root / SINGLE_FILE)
        except PipelineError as exc:
            raise PipelineError(f"{key}: {exc}") from None
        return {n: (SINGLE_FILE, shape) for n, shape in shapes.items()}, SINGLE_FILE
    if (root / BIN_INDEX_FILE).is_file():
        shards = _index_shards(root / BIN_INDEX_FILE, key)
        return {n: (file, None) for file, names in shards.items() for n in names}, BIN_INDEX_FILE
    if (root / BIN_FILE).is_file():
        return {}, BIN_FILE
    stray = sorted(f.name for f in root.glob("*.safetensors"))
    found = f"; it holds {len(stray)} other .safetensors files ({stray[0]}, ...) but no index naming them" if stray else ""
    raise PipelineError(
        f"{key}: checkpoint {root} has no weights: none of {SINGLE_FILE}, {INDEX_FILE}, {BIN_FILE}, "
        f"{BIN_INDEX_FILE} is there{found}"
    )


def _parameter_sources(skeleton: Any, names: Iterable[str]) -> dict[str, list[str]]:
    """``{model parameter: [checkpoint tensors loaded into it]}``, renamed as ``from_pretrained`` renames them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(skeleton)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    state = skeleton.state_dict()
    sources: dict[str, list[str]] = {}
    for name in names:
        target, _ = rename_source_key(name, renamings, converters, skeleton.base_model_prefix, state)
        sources.setdefault(target, []).append(name)
    return sources


def _uncovered_parameters(skeleton: Any, sources: dict[str, list[str]]) -> list[str]:
    """The model's parameters no checkpoint tensor is loaded into (tied and load-optional ones aside)."""
    tied = set(getattr(skeleton, "all_tied_weights_keys", None) or {})
    optional = [re.compile(p) for p in getattr(skeleton, "_keys_to_ignore_on_load_missing", None) or []]
    return [
        name
        for name, _ in skeleton.named_parameters()
        if name not in sources and name not in tied and not any(p.search(name) for p in optional)
    ]


def _embedding_rows(skeleton: Any, sources: dict[str, list[str]], tensors: Tensors) -> tuple[int, str] | None:
    """Rows of the model's input embedding and where that number comes from: the checkpoint tensor's
    shape in its safetensors header, else the config's ``vocab_size``; None for a model without one."""
    try:
        embedding = skeleton.get_input_embeddings().weight
    except (NotImplementedError, AttributeError):
        return None
    name = next((n for n, p in skeleton.named_parameters() if p is embedding), "")
    for source in sources.get(name, []):
        file, shape = tensors[source]
        if shape:
            return int(shape[0]), f"{source} in {file}"
    return int(embedding.shape[0]), "vocab_size in config.json"


def check_checkpoint(path: str | os.PathLike[str], skeleton: Any, trust_remote_code: bool = False, key: str = "model.source") -> None:
    """Check that a checkpoint directory can be loaded, reading only its index and tensor headers.

    ``skeleton`` is the model built from the checkpoint's config on the meta device. Missing weight
    files, an index naming absent shards or not covering every parameter, a truncated safetensors
    file, and a tokenizer with more entries (``len(tokenizer)``, added tokens included) than the
    input embedding has rows are one-line errors naming the file and the sizes.
    """
    root = Path(path)
    tensors, listed_in = _weight_tensors(root, key)
    sources = _parameter_sources(skeleton, tensors)
    if tensors:
        uncovered = _uncovered_parameters(skeleton, sources)
        if uncovered:
            total = sum(1 for _ in skeleton.named_parameters())
            raise PipelineError(
                f"{key}: the weights of {root} ({listed_in}) leave {len(uncovered)} of the model's {total} "
                f"parameters without a tensor: {', '.join(uncovered[:3])}{', ...' if len(uncovered) > 3 else ''}"
            )
    embedding = _embedding_rows(skeleton, sources, tensors)
    if embedding is None:
        return
    rows, where = embedding
    entries = len(load_tokenizer(root, trust_remote_code))
    if entries > rows:
        raise PipelineError(
            f"{key}: the tokenizer in {root} has {entries} entries (added tokens included) but the model's input "
            f"embedding has {rows} rows ({where}); token ids {rows} to {entries - 1} would index past it"
        )


def model_skeleton(config: Any) -> Any:
    """The causal LM of ``config`` on the meta device (no weights, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        if expert_counts(config):
            return causal_lm_class(config)._from_config(config)
        return AutoModelForCausalLM.from_config(config)


def build_manifest(
    source: str, path: str | os.PathLike[str], revision: str | None, trust_remote_code: bool = False, *, check: bool = False
) -> ModelManifest:
    """The manifest of a checkpoint directory; a dense or unsupported model is a one-line error.

    With ``check``, the weights and tokenizer are checked first (:func:`check_checkpoint`).
    """
    from pipeline.models.registry import get_adapter

    config = load_config(path, trust_remote_code)
    try:
        adapter = get_adapter(config)
    except PipelineError as exc:
        raise PipelineError(f"model.source {source}: {exc}") from None
    text = adapter.text_config(config)
    model_type = getattr(config, "model_type", "unknown")
    skeleton = model_skeleton(config)
    if check:
        check_checkpoint(path, skeleton, trust_remote_code)
    moe_layers = adapter.moe_layer_indices(skeleton)
    dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
    return ModelManifest(
        source=source,
        path=str(path),
        revision=revision,
        model_type=model_type,
        fingerprint=checkpoint_fingerprint(path),
        num_hidden_layers=int(text.num_hidden_layers),
        moe_layers=moe_layers,
        num_experts=adapter.num_experts(config),
        top_k=adapter.top_k(config),
        hidden_size=int(text.hidden_size),
        max_position_embeddings=getattr(text, "max_position_embeddings", None),
        torch_dtype=None if dtype is None else str(dtype).removeprefix("torch."),
    )

