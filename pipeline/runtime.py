"""Device, dtype and determinism settings shared by every stage."""

from __future__ import annotations

import ctypes
import ctypes.util
import random
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is the first CUDA device when one is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"runtime.device: {name} requested but no CUDA device is available (use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PipelineError(f"runtime.device: {name} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return device


def resolve_dtype(name: str, device: torch.device, key: str = "runtime.dtype") -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU; a dtype the device cannot run is an error."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise PipelineError(f"{key}: unknown dtype {name!r} (allowed: auto, {', '.join(DTYPES)})")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise PipelineError(f"{key}: float16 is not supported on the CPU (use float32 or bfloat16)")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise PipelineError(f"{key}: bfloat16 is not supported on {torch.cuda.get_device_name(device)} (use float16)")
    return dtype


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def configure_threads(threads: int) -> None:
    """Set torch's CPU thread count (0 keeps torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")


_TRIM: Any = None


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Hidden states are freed and reallocated once per layer; without trimming, glibc keeps the
    freed blocks and the process's resident memory creeps up over the first layers.
    """
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


def cuda_peak_bytes(device: torch.device | str, reset: bool = True) -> int | None:
    """Peak memory allocated by torch on CUDA ``device`` since the last reset (None off CUDA).

    With ``reset`` the peak starts again from the memory in use now, so consecutive calls give the
    peak of each stretch of work (e.g. each layer).
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    torch.cuda.synchronize(device)
    peak = int(torch.cuda.max_memory_allocated(device))
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak
