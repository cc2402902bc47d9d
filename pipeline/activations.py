"""The activation cache: every MoE block's input on the calibration tokens, one safetensors shard per layer.

:func:`cache_activations` consumes :func:`pipeline.streaming.stream_layers` (one decoder layer on the
compute device at a time) and writes, for each MoE layer ``i``, ``layers/layer_<iii>.safetensors``
holding ``x`` ``[num_samples, seq_len, hidden_size]``: the hidden state after the post-attention
norm. Nothing derivable from ``x`` (router logits, block outputs) is stored.

The work is resumable: before running layer ``i`` the decoder-layer inputs of ``i`` are saved in
the work directory (replacing those of earlier layers), and every shard is written to a temporary
name and renamed when complete, so a killed run restarts where it stopped and produces
byte-identical files. :func:`commit_cache` links the finished shards into the stage's output and
writes ``manifest.json``; :class:`ActivationCache` reads them back, verifying hashes.

An ``on_step`` callback sees each layer after its shard is written and may replace the layer's MoE
block (``step.replace_block``); the following layers then receive the modified model's hidden
states, which is the progressive mode of the search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.io import load_tensors, read_json, remove_path, sha256_file, tmp_sibling, write_error, write_json
from pipeline.models.base import MoEAdapter
from pipeline.runtime import dtype_name
from pipeline.streaming import LayerStep, stream_layers

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LAYERS_DIR = "layers"
STATE_DIR = "state"
_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}


def shard_name(layer: int) -> str:
    """File name of layer ``layer``'s shard."""
    return f"layer_{layer:03d}.safetensors"


def _state_name(layer: int) -> str:
    return f"hidden_{layer:03d}.safetensors"


# -- writing -----------------------------------------------------------------------------------------
def write_chunked_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Sequence[torch.Tensor]],
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> tuple[str, int]:
    """Write tensors given as chunks along dim 0 as one safetensors file, atomically.

    Only one chunk at a time is copied to host memory (converted to ``dtype`` when given). The
    header is canonical JSON, so equal tensors give byte-identical files. Returns the file's
    sha256 and size.
    """
    path = Path(path)
    names = sorted(tensors)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in names:
        chunks = tensors[name]
        if not chunks:
            raise ValueError(f"tensor {name!r} has no chunks")
        trailing = tuple(chunks[0].shape[1:])
        if any(tuple(c.shape[1:]) != trailing for c in chunks):
            raise ValueError(f"chunks of {name!r} differ in their trailing shape")
        out_dtype = dtype or chunks[0].dtype
        rows = sum(int(c.shape[0]) for c in chunks)
        nbytes = rows * math.prod(trailing) * torch.empty((), dtype=out_dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[out_dtype], "shape": [rows, *trailing], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "wb") as fh:

            def emit(data: bytes | memoryview) -> None:
                digest.update(data)
                fh.write(data)

            emit(struct.pack("<Q", len(head)))
            emit(head)
            for name in names:
                for chunk in tensors[name]:
                    host = chunk.detach().to(dtype or chunk.dtype).contiguous().cpu()
                    emit(memoryview(host.reshape(-1).view(torch.uint8).numpy()))
                    del host
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        remove_path(tmp)
        raise write_error(path, exc) from exc
    except BaseException:
        remove_path(tmp)
        raise
    return digest.hexdigest(), 8 + len(head) + offset


# -- the caching loop ----------------------------------------------------------------------------------
@dataclass
class LayerInfo:
    """What :func:`cache_activations` reports about one finished MoE layer."""

    layer: int
    seconds: float
    tokens_per_s: float
    bytes_written: int
    reused: bool  # the shard was already complete in the work dir


@dataclass
class CacheRun:
    """The shards a :func:`cache_activations` call left in its work dir, and how the run went."""

    work_dir: Path
    moe_layers: list[int]
    files: dict[int, Path]
    sha256: dict[int, str]
    num_samples: int
    seq_len: int
    hidden_size: int
    dtype: torch.dtype
    start_layer: int | None  # first layer this call ran (None: everything was already done)
    layers_run: int = 0
    seconds: float = 0.0
    bytes_written: int = 0
    layer_info: list[LayerInfo] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Calibration tokens pushed through one decoder layer per second, averaged over the layers run."""
        if self.seconds <= 0 or self.layers_run == 0:
            return 0.0
        return self.num_samples * self.seq_len * self.layers_run / self.seconds


def _clean_temporaries(folder: Path) -> None:
    if folder.is_dir():
        for stale in folder.glob("*.tmp-*"):
            remove_path(stale)


def _resume_point(state_dir: Path, num_batches: int) -> tuple[int, list[torch.Tensor] | None]:
    """The latest saved decoder-layer inputs: ``(layer, per-micro-batch hidden states)``, or ``(0, None)``."""
    saved = sorted(state_dir.glob("hidden_*.safetensors"))
    for path in reversed(saved):
        layer = int(path.stem.split("_")[1])
        try:
            tensors = load_tensors(path, what="saved hidden states")
        except PipelineError as exc:
            log.warning("ignoring unreadable resume state %s: %s", path, exc)
            continue
        keys = sorted(tensors)
        if len(keys) != num_batches:
            log.warning("ignoring resume state %s: %d micro-batches, expected %d", path, len(keys), num_batches)
            continue
        return layer, [tensors[k] for k in keys]
    return 0, None


def _save_state(state_dir: Path, layer: int, hidden: list[torch.Tensor]) -> int:
    """Save the inputs of decoder layer ``layer`` and drop older saved inputs; returns the bytes written."""
    entries = {f"h{b:06d}": [h] for b, h in enumerate(hidden)}
    _, size = write_chunked_safetensors(state_dir / _state_name(layer), entries, metadata={"layer": str(layer)})
    for old in state_dir.glob("hidden_*.safetensors"):
        if int(old.stem.split("_")[1]) < layer:
            remove_path(old)
    return size


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _shard_sha(path: Path) -> str:
    side = _sidecar(path)
    if side.is_file():
        text = side.read_text().strip()
        if len(text) == 64:
            return text
    digest = sha256_file(path)
    side.write_text(digest + "\n")
    return digest


@torch.no_grad()
def cache_activations(
    model: nn.Module,
    adapter: MoEAdapter,
    input_ids: torch.Tensor,
    *,
    work_dir: str | os.PathLike[str],
    dtype: torch.dtype,
    batch_size: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_layer: Callable[[LayerInfo], None] | None = None,
    on_step: Callable[[LayerStep], None] | None = None,
) -> CacheRun:
    """Write every MoE layer's input ``x`` ``[N, L, d]`` (in ``dtype``) to ``work_dir/layers``, resuming.

    The model stays where it is (normally the CPU); each decoder layer visits ``device`` in turn.
    ``work_dir`` must be specific to the model, the tokens, ``dtype``, ``batch_size``, the compute
    device and dtype, and ``on_step``'s behaviour: a restart continues from what it finds there.
    ``on_layer`` is called after each MoE layer's shard is complete; ``on_step`` after it, with the
    :class:`LayerStep` (it may replace the block: progressive mode).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise PipelineError(f"calibration input_ids must be a non-empty [num_samples, seq_len] tensor, got {tuple(input_ids.shape)}")
    moe_layers = adapter.moe_layer_indices(model)
    if not moe_layers:
        raise PipelineError(f"{type(model).__name__} has no MoE layers to cache")
    work = Path(work_dir)
    layers_dir, state_dir = work / LAYERS_DIR, work / STATE_DIR
    for folder in (layers_dir, state_dir):
        folder.mkdir(parents=True, exist_ok=True)
        _clean_temporaries(folder)
    device = torch.device(device)
    num_samples, seq_len = (int(s) for s in input_ids.shape)
    hidden_size = int(adapter.text_config(model.config).hidden_size)
    num_batches = math.ceil(num_samples / batch_size)
    files = {i: layers_dir / shard_name(i) for i in moe_layers}
    missing = [i for i in moe_layers if not files[i].is_file()]
    run = CacheRun(work, moe_layers, files, {}, num_samples, seq_len, hidden_size, dtype, start_layer=None)
    if missing:
        start, start_hidden = _resume_point(state_dir, num_batches)
        if missing[0] < start:  # a shard vanished behind the saved state: start over
            log.warning("shard of layer %d is missing behind the resume point %d; starting from layer 0", missing[0], start)
            start, start_hidden = 0, None
        if start > 0:
            log.info("resuming at layer %d (%d of %d MoE shards already complete)", start, len(moe_layers) - len(missing), len(moe_layers))
        run.start_layer = start
        _stream(model, adapter, input_ids, run, start, start_hidden, batch_size, device, progress, on_layer, on_step)
    run.sha256 = {i: _shard_sha(files[i]) for i in moe_layers}
    return run


def _stream(
    model: nn.Module,
    adapter: MoEAdapter,
    input_ids: torch.Tensor,
    run: CacheRun,
    start: int,
    start_hidden: list[torch.Tensor] | None,
    batch_size: int,
    device: torch.device,
    progress: bool,
    on_layer: Callable[[LayerInfo], None] | None,
    on_step: Callable[[LayerStep], None] | None,
) -> None:
    state_dir = run.work_dir / STATE_DIR
    last = run.moe_layers[-1]
    tokens = run.num_samples * run.seq_len
    began = tick = time.perf_counter()
    stream = stream_layers(
        model,
        adapter,
        input_ids,
        batch_size=batch_size,
        device=device,
        start_layer=start,
        start_hidden=start_hidden,
        progress=progress,
        desc="activations",
    )
    try:
        for step in stream:
            i = step.index
            written = 0
            if i != start:
                written += _save_state(state_dir, i, step.hidden_in)
            run.layers_run += 1
            if step.block is not None:
                path = run.files[i]
                reused = path.is_file()
                if not reused:
                    chunks = [x.reshape(-1, run.seq_len, run.hidden_size) for x in step.moe_input]
                    digest, size = write_chunked_safetensors(path, {"x": chunks}, dtype=run.dtype, metadata={"layer": str(i)})
                    _sidecar(path).write_text(digest + "\n")
                    written += size
                now = time.perf_counter()
                info = LayerInfo(i, now - tick, tokens / max(now - tick, 1e-9), written, reused)
                run.layer_info.append(info)
                log.info(
                    "layer %d: %.0f tokens/s, %s%.1f MB written",
                    i,
                    info.tokens_per_s,
                    "shard reused, " if reused else "",
                    written / 1e6,
                )
                if on_layer is not None:
                    on_layer(info)
            run.bytes_written += written
            if on_step is not None:
                on_step(step)
            step.moe_input.clear()
            del step
            tick = time.perf_counter()
            if i >= last:
                break
    finally:
        stream.close()
        run.seconds += time.perf_counter() - began


def checkpoint_state_key(path: str | os.PathLike[str]) -> list[tuple[str, int, int]]:
    """Name, size and modification time of a checkpoint's weight files: part of a work-dir key.

    The model fingerprint hashes only configs and tensor headers, so a retrained model of the same
    shape keeps it; these stats make a resumed run start over when the weights were rewritten.
    """
    root = Path(path)
    files = sorted([*root.glob("*.safetensors"), *root.glob("*.bin")])
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


# -- committing and reading ------------------------------------------------------------------------------
def _link_or_copy(src: Path, dst: Path) -> None:
    remove_path(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def commit_cache(
    run: CacheRun,
    out_dir: str | os.PathLike[str],
    *,
    model_fingerprint: str,
    calibration: str,
    calibration_fingerprint: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Link the finished shards into ``out_dir/layers`` and write ``out_dir/manifest.json``."""
    out = Path(out_dir)
    (out / LAYERS_DIR).mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Any]] = {}
    for i in run.moe_layers:
        rel = f"{LAYERS_DIR}/{shard_name(i)}"
        _link_or_copy(run.files[i], out / rel)
        files[str(i)] = {"file": rel, "sha256": run.sha256[i], "bytes": (out / rel).stat().st_size}
    manifest = {
        "model_fingerprint": model_fingerprint,
        "calibration": calibration,
        "calibration_fingerprint": calibration_fingerprint,
        "dtype": dtype_name(run.dtype),
        "num_samples": run.num_samples,
        "seq_len": run.seq_len,
        "hidden_size": run.hidden_size,
        "moe_layers": list(run.moe_layers),
        "files": files,
        **dict(extra or {}),
    }
    write_json(out / MANIFEST, manifest)
    return manifest


_REQUIRED = ("model_fingerprint", "calibration", "calibration_fingerprint", "dtype", "num_samples", "seq_len", "hidden_size", "moe_layers", "files")


class ActivationCache:
    """Read access to the activations stage's output directory (``manifest.json`` + ``layers/``)."""

    def __init__(self, path: str | os.PathLike[str], expected_model_fingerprint: str | None = None) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise PipelineError(f"{manifest_path} does not exist: run the activations stage first (dvc repro activations)")
        manifest = read_json(manifest_path, what="activations manifest")
        missing = [k for k in _REQUIRED if not isinstance(manifest, dict) or k not in manifest]
        if missing:
            raise PipelineError(f"{manifest_path} is malformed (missing {', '.join(missing)}); rerun the activations stage")
        if expected_model_fingerprint is not None and manifest["model_fingerprint"] != expected_model_fingerprint:
            raise PipelineError(
                f"{manifest_path}: the activations were made from another model (fingerprint "
                f"{manifest['model_fingerprint']}, expected {expected_model_fingerprint}); rerun the activations stage "
                f"(dvc repro activations)"
            )
        self.manifest: dict[str, Any] = manifest
        self._manifest_path = manifest_path
        self.check_files()

    def check_files(self) -> None:
        """Every shard the manifest lists exists with its recorded size (a stat, no read)."""
        for i in sorted(self.manifest["files"], key=int):
            self._shard(int(i))

    def _shard(self, i: int) -> tuple[Path, dict[str, Any]]:
        """Path and manifest entry of layer ``i``'s shard, which exists with its recorded size."""
        entry = self.manifest["files"].get(str(i))
        if entry is None:
            raise PipelineError(f"{self._manifest_path}: layer {i} is not in the activation cache (MoE layers: {self.layers})")
        path = self.path / entry["file"]
        if not path.is_file():
            raise PipelineError(f"activation shard {path} is missing; rerun the activations stage (dvc repro activations)")
        size = path.stat().st_size
        if "bytes" in entry and size != int(entry["bytes"]):
            raise PipelineError(
                f"activation shard {path} is corrupt or truncated ({size} bytes, {MANIFEST} records "
                f"{entry['bytes']}); rerun the activations stage (dvc repro activations)"
            )
        return path, entry

    @property
    def layers(self) -> list[int]:
        """Indices of the MoE layers in the cache, ascending."""
        return [int(i) for i in self.manifest["moe_layers"]]

    @property
    def calibration(self) -> str:
        """Name of the calibration set the activations were computed on."""
        return str(self.manifest["calibration"])

    def load(self, i: int) -> torch.Tensor:
        """The MoE input of layer ``i``: ``[num_samples, seq_len, hidden_size]``, hash- and value-checked."""
        path, entry = self._shard(i)
        if sha256_file(path) != entry["sha256"]:
            raise PipelineError(
                f"activation shard {path} is corrupt or truncated (sha256 differs from {MANIFEST}); rerun the activations stage"
            )
        x = load_tensors(path, what="activation shard").get("x")
        m = self.manifest
        shape = (int(m["num_samples"]), int(m["seq_len"]), int(m["hidden_size"]))
        if x is None or tuple(x.shape) != shape or dtype_name(x.dtype) != m["dtype"]:
            got = "no tensor 'x'" if x is None else f"{tuple(x.shape)} {dtype_name(x.dtype)}"
            raise PipelineError(f"activation shard {path} holds {got}, expected {shape} {m['dtype']}; rerun the activations stage")
        for start in range(0, shape[0], 16):
            if not bool(torch.isfinite(x[start : start + 16]).all()):
                raise PipelineError(
                    f"activation shard {path} contains NaN or inf values (layer {i}); the model overflows in the compute "
                    f"or cache dtype: rerun with runtime.dtype and activations.dtype float32"
                )
        return x


__all__ = [
    "ActivationCache",
    "CacheRun",
    "LayerInfo",
    "cache_activations",
    "checkpoint_state_key",
    "commit_cache",
    "shard_name",
    "write_chunked_safetensors",
]
