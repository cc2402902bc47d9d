"""Memory of a model: bytes of its weights, and peak process / CUDA memory over a block of work."""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (tied parameters counted once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel() * param.element_size()
    return total


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def _hwm_bytes() -> int | None:
    """Linux's peak RSS since the last reset (``VmHWM``), or None where unavailable."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset Linux's peak-RSS counter to the current RSS; False where not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _hwm_bytes() is not None


def _process_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakMemory:
    """Context manager measuring peak RSS and peak CUDA memory allocated inside the block.

    On Linux the RSS peak is reset on entry, so it covers only the block; elsewhere it is the
    process's peak so far (``rss_scope`` says which). With ``cuda`` true, the CUDA peak is summed
    over every visible device (a model spread with a device map counts whole).
    """

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = bool(cuda) and torch.cuda.is_available()
        self.peak_rss_bytes: int | None = None
        self.peak_cuda_bytes: int | None = None
        self.rss_scope = "process"
        self._block_hwm = False

    def __enter__(self) -> PeakMemory:
        self._block_hwm = _reset_hwm()
        self.rss_scope = "block" if self._block_hwm else "process"
        if self.cuda:
            for i in range(torch.cuda.device_count()):
                torch.cuda.synchronize(i)
                torch.cuda.reset_peak_memory_stats(i)
        return self

    def __exit__(self, *exc: Any) -> None:
        hwm = _hwm_bytes() if self._block_hwm else None
        self.peak_rss_bytes = hwm if hwm is not None else _process_peak_bytes()
        if self.cuda:
            total = 0
            for i in range(torch.cuda.device_count()):
                torch.cuda.synchronize(i)
                total += int(torch.cuda.max_memory_allocated(i))
            self.peak_cuda_bytes = total

    def as_dict(self) -> dict[str, Any]:
        """``peak_rss_bytes``, ``peak_cuda_bytes`` (None without CUDA) and ``rss_scope``."""
        return {
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_cuda_bytes": self.peak_cuda_bytes,
            "rss_scope": self.rss_scope,
        }
