"""Resolving, fingerprinting and loading checkpoints, and the model manifest every stage reads."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.io import read_json, write_json

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
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise PipelineError(f"checkpoint file {path} is truncated")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise PipelineError(f"checkpoint file {path} has a corrupt header")
        return fh.read(size)


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
) -> Any:
    """Load a causal LM from a local checkpoint directory, in eval mode.

    ``device_map`` (for example ``"auto"``) spreads a model larger than one device over GPUs and
    CPU with accelerate (``offload_folder`` holds weights a map sends to ``"disk"``); otherwise the
    whole model goes to ``device``. ``offload`` (``runtime.offload``): ``layers`` leaves the decoder
    layers in the checkpoint, to be read one at a time by the layer stream (``pipeline.offload``;
    everything else is loaded on the CPU), ``auto`` does so when the weights would not fit
    comfortably in RAM, ``none`` loads everything. A checkpoint that cannot be read layer by layer
    is loaded whole, with a log line saying why.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise PipelineError(f"model checkpoint {path} does not exist or has no config.json")
    if offload not in ("none", "layers", "auto"):
        raise PipelineError(f"runtime.offload: unknown mode {offload!r} (allowed: none, layers, auto)")
    if device_map is None and offload != "none":
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
    try:
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


def build_manifest(source: str, path: str | os.PathLike[str], revision: str | None, trust_remote_code: bool = False) -> ModelManifest:
    """The manifest of a checkpoint directory; a dense or unsupported model is a one-line error."""
    from pipeline.models.registry import get_adapter

    config = load_config(path, trust_remote_code)
    try:
        adapter = get_adapter(config)
    except PipelineError as exc:
        raise PipelineError(f"model.source {source}: {exc}") from None
    text = adapter.text_config(config)
    model_type = getattr(config, "model_type", "unknown")
    moe_layers = moe_layer_indices_from_config(adapter, config)
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


def moe_layer_indices_from_config(adapter: Any, config: Any) -> list[int]:
    """MoE layer indices, found by building the model skeleton on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return adapter.moe_layer_indices(skeleton)
