"""Atomic file and directory writes, safetensors helpers and content fingerprints.

Every output of the pipeline is written to a temporary sibling path and renamed into place, so a
crash never leaves a half-written file or directory under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import PipelineError

_TMP_TAG = ".tmp-"


def _check_writable(path: Path) -> None:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"cannot create output directory {parent}: {exc.strerror}") from exc
    if not os.access(parent, os.W_OK):
        raise PipelineError(f"output directory {parent} is not writable")


#: Write failures that mean the disk, the user's quota or the process's file-size limit is full.
_FULL = {
    errno.ENOSPC: ("No space left on device", "no space left on device"),
    errno.EDQUOT: ("Disk quota exceeded", "disk quota exceeded"),
    errno.EFBIG: ("File too large", "file size limit reached"),
}


def _is_write_failure(exc: BaseException) -> bool:
    """An OS error, or safetensors' report of one (it wraps the OS error in its own type)."""
    return isinstance(exc, OSError) or (isinstance(exc, SafetensorError) and "I/O error" in str(exc))


def write_error(path: Path, exc: OSError | SafetensorError) -> PipelineError:
    """A one-line error for a failed write of the output ``path``, naming the file where known."""
    code = getattr(exc, "errno", None)
    if code is None:  # safetensors reports the OS error in its message only
        code = next((c for c, (text, _) in _FULL.items() if text in str(exc)), None)
    filename = getattr(exc, "filename", None)
    where = f" ({filename})" if filename and str(filename) != str(path) else ""
    if code in _FULL:
        return PipelineError(f"{_FULL[code][1]} while writing {path}{where}")
    return PipelineError(f"cannot write {path}{where}: {getattr(exc, 'strerror', None) or exc}")


def tmp_sibling(path: Path) -> Path:
    """A unique temporary name next to ``path`` (same filesystem, so rename is atomic)."""
    return path.with_name(f"{path.name}{_TMP_TAG}{uuid.uuid4().hex[:8]}")


def remove_path(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clean_stale_tmp(path: Path) -> None:
    """Remove temporaries that a crashed earlier write of ``path`` left behind."""
    if path.parent.is_dir():
        for stale in path.parent.glob(f"{path.name}{_TMP_TAG}*"):
            remove_path(stale)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    path = Path(path)
    _check_writable(path)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        remove_path(tmp)
        raise write_error(path, exc) from exc
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Canonical JSON text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as canonical JSON, atomically."""
    return atomic_write_text(path, dumps_json(obj))


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    """Read a JSON file, with a one-line error naming it when absent or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{what} {path} is not valid JSON: {exc}") from exc


def save_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Save tensors as safetensors, atomically."""
    path = Path(path)
    _check_writable(path)
    tmp = tmp_sibling(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException as exc:
        remove_path(tmp)
        if _is_write_failure(exc):
            raise write_error(path, exc) from exc
        raise
    return path


def load_tensors(path: str | os.PathLike[str], what: str = "tensor file") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or truncated file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PipelineError(f"{what} {path} is corrupt or truncated ({exc}); delete it and rerun the stage") from exc


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds.

    A directory already at ``path`` (complete or left half-written by an earlier crash) is
    replaced as a whole; on failure the temporary is removed and ``path`` is left as it was.
    """
    path = Path(path)
    _check_writable(path)
    clean_stale_tmp(path)
    tmp = tmp_sibling(path)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        yield tmp
        old = None
        if path.exists():
            old = tmp_sibling(path)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            remove_path(old)
    except BaseException as exc:
        remove_path(tmp)
        if _is_write_failure(exc):
            raise write_error(path, exc) from exc
        raise


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable value."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())[:16]


def scratch_dir(root: str | os.PathLike[str], key: Any) -> Path:
    """A resumable work directory under ``root`` named by the hash of ``key`` (the run's inputs).

    The work directories of other keys under ``root`` are removed: they hold what unfinished runs
    with other inputs left (for example before a bad input was fixed), which this run cannot use.
    """
    path = Path(root) / fingerprint(key)
    if path.parent.is_dir():
        for other in path.parent.iterdir():
            if other != path:
                remove_path(other)
    path.mkdir(parents=True, exist_ok=True)
    return path


def disk_free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


__all__ = [
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "clean_stale_tmp",
    "disk_free_bytes",
    "dumps_json",
    "fingerprint",
    "load_tensors",
    "read_json",
    "remove_path",
    "save_tensors",
    "scratch_dir",
    "sha256_bytes",
    "sha256_file",
    "tmp_sibling",
    "write_json",
]
