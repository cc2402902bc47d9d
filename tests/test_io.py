"""Atomic writes: a failure leaves the previous content (or nothing), never a half-written file."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, load_tensors, read_json, save_tensors, write_json


def test_atomic_dir_replaces_whole_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.bin").write_text("half-written by a crash")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("complete")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_atomic_dir_failure_leaves_previous_content(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("v2 partial")
        raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_removes_stale_temporaries(tmp_path):
    (tmp_path / "out.tmp-deadbeef").mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unwritable_directory_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        with pytest.raises(PipelineError, match="not writable"):
            write_json(locked / "x.json", {"a": 1})
    finally:
        locked.chmod(0o700)


def test_disk_full_is_reported_and_leaves_nothing(tmp_path, monkeypatch):
    real_replace = os.replace

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(PipelineError, match="no space left on device"):
        write_json(tmp_path / "x.json", {"a": 1})
    monkeypatch.setattr(os, "replace", real_replace)
    assert list(tmp_path.iterdir()) == []


def test_truncated_safetensors_is_one_line(tmp_path):
    path = save_tensors(tmp_path / "t.safetensors", {"x": torch.arange(1000.0)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match="corrupt or truncated"):
        load_tensors(path)


def test_json_roundtrip_and_errors(tmp_path):
    write_json(tmp_path / "a.json", {"b": [1, 2]})
    assert read_json(tmp_path / "a.json") == {"b": [1, 2]}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PipelineError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_output_under_a_file_is_one_line(tmp_path):
    """An output path whose parent is a file (cannot be a directory) fails with one line, even as root."""
    blocker = tmp_path / "outputs"
    blocker.write_text("not a directory")
    with pytest.raises(PipelineError, match="cannot create output directory"):
        write_json(blocker / "stage" / "x.json", {"a": 1})
