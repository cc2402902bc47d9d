"""Crash safety and determinism of the whole chain, with real processes and a real ``kill -9``.

Two copies of the project run the same params from the same corpus, model and calibration set (the
session's reproduced tiny project with a larger calibration set; the model stage's determinism is
tests/test_pipeline_e2e.py's). One runs ``dvc repro export`` straight through, at the same time as the
other is killed (SIGKILL to ``dvc repro`` and the stage it runs) once the activations stage has
written its first layer, then again once the search has finished its first layer, and each time
``dvc repro export`` is started again. The killed runs must resume where they stopped, and every
output must equal the uninterrupted run's byte for byte: the activation shards, ``selection.json``
and the exported checkpoint's tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline.io import sha256_file
from tests.project import clone_project, env, merge, read_params, run, set_params

pytestmark = pytest.mark.slow

#: Enough calibration tokens that caching and searching a layer take a noticeable fraction of a second.
SLOW_ENOUGH = {
    "calibration": {"sets": {"general": {"num_samples": 256, "seq_len": 128}}},
    "activations": {"batch_size": 2},
    "search": {"r": 4, "token_chunk": 512},
}
WORK = Path("outputs/.work")


def repro_killed_when(project: Path, ready: Callable[[Path], bool], timeout: float = 600) -> str:
    """Start ``dvc repro export``, SIGKILL its whole process group as soon as ``ready(project)``;
    returns what it printed. Fails if the run ends before the moment comes."""
    log = project / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["dvc", "repro", "export"], cwd=project, env=env(project), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready(project):
            if proc.poll() is not None:
                raise AssertionError(f"dvc repro ended ({proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the kill point never came")
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    return log.read_text()


def activation_shards_done(project: Path) -> bool:
    return any((project / WORK / "activations").glob("*/layers/*.safetensors"))


def search_layers_done(project: Path) -> bool:
    return any((project / WORK / "search").glob("*/layer_*.json"))


def outputs_of(project: Path) -> dict[str, object]:
    """What must not depend on crashes: cached activations, the selection, the exported tensors."""
    manifest = json.loads((project / "outputs/activations/manifest.json").read_text())
    shards = {f: sha256_file(project / "outputs/activations" / entry["file"]) for f, entry in manifest["files"].items()}
    assert shards == {f: entry["sha256"] for f, entry in manifest["files"].items()}
    model = project / "outputs/export/model"
    tensors = {}
    for file in sorted(model.glob("*.safetensors")):
        tensors.update({k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in load_file(str(file)).items()})
    return {
        "activation shards": shards,
        "selection.json": (project / "outputs/search/selection.json").read_text(),
        "exported tensors": tensors,
        "kept_experts": json.loads((model / "config.json").read_text())["kept_experts"],
    }


def test_kill_9_in_activations_and_search_resumes_to_identical_outputs(reproduced_project: Path, tmp_path: Path) -> None:
    clean = clone_project(reproduced_project, tmp_path / "clean")
    set_params(clean, merge(read_params(clean), SLOW_ENOUGH))
    run(clean, "git", "commit", "-qam", "slow enough")
    run(clean, "dvc", "repro", "calibration@general")
    assert read_params(clean)["model"]["embedded"]["num_layers"] >= 2  # a layer to kill in after the first
    crashed = clone_project(clean, tmp_path / "crashed")

    log = tmp_path / "clean.log"
    with open(log, "w") as out:  # the uninterrupted run, side by side with the killed ones
        straight = subprocess.Popen(["dvc", "repro", "export"], cwd=clean, env=env(clean), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        first = repro_killed_when(crashed, activation_shards_done)
        assert "Running stage 'activations'" in first
        assert not (crashed / "outputs/activations/manifest.json").exists()  # no half-made output

        second = repro_killed_when(crashed, search_layers_done)  # resumes the activations, dies in the search
        assert re.search(r"layer 0: .*shard reused", second), second[-3000:]  # the shard done before the kill
        assert not (crashed / "outputs/search/selection.json").exists()

        done = run(crashed, "dvc", "repro", "export")
        third = done.stdout + done.stderr
        assert "already done (resumed" in third, third[-3000:]
        assert "Running stage 'search'" in third and "Running stage 'activations'" not in third

        assert straight.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        if straight.poll() is None:
            os.killpg(straight.pid, signal.SIGKILL)
            straight.wait(timeout=60)

    assert outputs_of(crashed) == outputs_of(clean)
    assert not list((crashed / WORK).rglob("*.safetensors")), "resumable state left after success"
    assert "up to date" in run(crashed, "dvc", "status", "export").stdout
