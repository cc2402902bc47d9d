"""Temporary copies of this repository for end-to-end tests with real git, DVC and MLflow."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: On PYTHONPATH while `dvc repro` runs, it records the project modules each stage process imports.
TRACER = ROOT / "tests" / "import_trace"

#: A params override that runs the whole chain on a tiny model in well under a minute per stage.
TINY: dict[str, Any] = {
    "corpus": {
        "max_chars_per_domain": 100000,
        "validation_fraction": 0.1,
        "test_fraction": 0.15,
        "eval": {"mc_items_per_domain": 16, "ppl_docs_per_domain": 4, "ppl_doc_chars": 300},
    },
    "model": {
        "embedded": {
            "vocab_size": 512,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "max_position_embeddings": 128,
            "train": {"seq_len": 64, "batch_size": 8, "steps": 40, "warmup_steps": 4, "eval_tokens_per_domain": 2048},
        }
    },
    "calibration": {
        "sets": {
            "general": {"num_samples": 8, "seq_len": 64},
            "arith": {"num_samples": 8, "seq_len": 64},
        }
    },
    "activations": {"batch_size": 4},
    "search": {"token_chunk": 256},
    "recover": {"steps": 4, "batch_size": 4, "checkpoint_every": 2},
    "benchmark": {"limit": 8, "batch_size": 8, "speed": {"prompts": 1, "new_tokens": 4, "repeats": 1, "warmup": 0}},
}


def merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_frozen = threading.local()


@contextlib.contextmanager
def frozen_environ(environ: Mapping[str, str]) -> Iterator[None]:
    """Commands this thread starts inherit ``environ`` instead of ``os.environ`` (a build in the
    background is not affected by what runs meanwhile)."""
    _frozen.environ = dict(environ)
    try:
        yield
    finally:
        del _frozen.environ


def env(project: Path, **extra: str) -> dict[str, str]:
    """Environment for commands in a project copy: this venv's tools first, offline, no telemetry."""
    base = getattr(_frozen, "environ", os.environ)
    e = {k: v for k, v in base.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME")}
    e.update(
        PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
    )
    e.update(extra)
    return e


def run(project: Path, *args: str, check: bool = True, timeout: int = 900, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run a command in the project copy; on failure the output is in the assertion message."""
    proc = subprocess.run(list(args), cwd=project, env=env(project, **extra_env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def tracked_files() -> list[str]:
    """Files git would commit: tracked plus untracked-but-not-ignored."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    # What the developer's own `dvc repro` wrote (dvc.lock, run.json and metrics.json under outputs/)
    # stays behind: a project copy starts from the sources alone, as a fresh clone does.
    return [
        line for line in out.stdout.splitlines()
        if (ROOT / line).is_file() and not line.startswith("outputs/") and line != "dvc.lock"
    ]


def make_project(dest: Path, override: Mapping[str, Any] | None = None) -> Path:
    """A fresh git repository holding a copy of this project, with ``override`` merged into params.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in tracked_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    set_params(dest, merge(params, override or TINY))
    run(dest, "git", "init", "-q")
    run(dest, "git", "add", "-A")
    run(dest, "git", "commit", "-qm", "test project")
    return dest


def stage_dir_project(dest: Path, override: Mapping[str, Any] | None = None) -> Path:
    """A bare folder to run single stages in: this repo's dvc.yaml (the stages' declarations) and
    params.yaml with ``override`` merged in; the code is imported from this repo. Upstream outputs are
    the test's to write (:func:`write_calibration_set`, :func:`write_run_records`)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "dvc.yaml", dest / "dvc.yaml")
    set_params(dest, merge(yaml.safe_load((ROOT / "params.yaml").read_text()), override or {}))
    return dest


def specs_changed(project: Path) -> None:
    """Forget the stage declarations read so far (a test changed dvc.yaml or params.yaml)."""
    from stages.spec import _specs

    _specs.cache_clear()


def write_run_records(project: Path, *stages: str) -> None:
    """``run.json`` of upstream ``stages`` (no MLflow run), as if they had run."""
    from stages.spec import RUN_RECORD, spec

    specs_changed(project)
    for name in stages:
        path = project / spec(name, project).out_dir / RUN_RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'{{"stage": "{name}", "run_id": null}}\n')


def write_calibration_set(project: Path, name: str, input_ids: Any) -> Path:
    """``outputs/calibration/<name>/`` holding ``input_ids`` and a manifest, as the calibration stage writes them."""
    from pipeline.calibration import input_ids_fingerprint, write_calibration_set as write
    from stages.spec import spec

    specs_changed(project)
    folder = project / spec(f"calibration@{name}", project).out_dir
    manifest = {"name": name, "num_samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1]),
                "num_tokens": int(input_ids.numel()), "sources": [], "fingerprint": input_ids_fingerprint(input_ids)}
    write(folder, input_ids, manifest)
    write_run_records(project, f"calibration@{name}")
    return folder


def run_stage(
    project: Path,
    stage: str,
    *,
    timeout: int = 600,
    preexec_fn: Callable[[], None] | None = None,
    **extra_env: str,
) -> subprocess.CompletedProcess[str]:
    """``python -m stages.<stage>`` in ``project`` as ``dvc repro`` runs it (``calibration@arith`` runs
    ``stages.calibration arith``), with MLflow's store in ``<project>/mlflow.db``. The project's own
    copy of the code wins where it has one (the working folder comes first on the import path); a
    bare stage folder imports it from this repo. ``preexec_fn`` runs in the stage's process before it
    starts (e.g. a resource limit). Never raises on failure: tests read the status and stderr."""
    script, _, item = stage.partition("@")
    extra_env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    extra_env.setdefault("PYTHONPATH", str(ROOT))
    cmd = [sys.executable, "-m", f"stages.{script}", *([item] if item else [])]
    return subprocess.run(
        cmd, cwd=project, env=env(project, **extra_env), capture_output=True, text=True, timeout=timeout,
        preexec_fn=preexec_fn,  # noqa: PLW1509 - resource limits only, no threads started here
    )


def set_params(project: Path, params: Mapping[str, Any]) -> None:
    """Write params.yaml in the project copy."""
    (project / "params.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=False))


def read_params(project: Path) -> dict[str, Any]:
    """params.yaml of the project copy."""
    return yaml.safe_load((project / "params.yaml").read_text())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, *args: str, cwd: Path, log: Path, timeout: float = 120.0) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 at a free port; yields its URL once ``/health`` answers.

    The server runs in its own process group and is stopped by that group's id (SIGTERM, then
    SIGKILL), whatever the block does.
    """
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_store_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *args]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env(cwd), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310 - loopback
                    if resp.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not come up ({' '.join(cmd)}):\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def reproduce(dest: Path, override: Mapping[str, Any] | None = None) -> Path:
    """:func:`make_project`, then ``dvc repro`` committed as a user would commit it (dvc.lock, run.json,
    metrics.json). Each stage process records the project modules it imported in
    ``<dest>/../imports/<stage>.json`` (tests/import_trace)."""
    project = make_project(dest, override)
    trace = project.parent / "imports"
    trace.mkdir()
    run(project, "dvc", "repro", PYTHONPATH=str(TRACER), IMPORT_TRACE_DIR=str(trace))
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "repro")
    return project


def _not_dvc_tmp(src: Path) -> Callable[[str, list[str]], list[str]]:
    """``copytree`` ignore: DVC's state and locks (``.dvc/tmp``, keyed by inode) stay behind."""
    return lambda folder, names: ["tmp"] if Path(folder) == src / ".dvc" else []


def clone_project(src: Path, dest: Path) -> Path:
    """A copy of a project ``dvc repro`` completed (git history, DVC cache, outputs, MLflow store) that
    stands on its own: its MLflow store keeps the artifacts of new runs in the copy. DVC rehashes the
    copied files on first use; dvc.lock's hashes hold, so the copy is as up to date as ``src``."""
    src, dest = src.resolve(), dest.resolve()
    shutil.copytree(src, dest, symlinks=True, ignore=_not_dvc_tmp(src))
    db = dest / "mlflow.db"
    if db.is_file():
        with contextlib.closing(sqlite3.connect(db)) as con, con:
            con.execute("update experiments set artifact_location = replace(artifact_location, ?, ?)", (str(src), str(dest)))
            con.execute("update runs set artifact_uri = replace(artifact_uri, ?, ?)", (str(src), str(dest)))
    return dest


def rerun_forced(reproduced: Path, dest: Path) -> Path:
    """A clone of ``reproduced`` after ``dvc repro -f``: every stage rerun with unchanged inputs, in
    another folder; what ``dvc repro`` printed is in ``<dest>/../repro.log``."""
    project = clone_project(reproduced, dest)
    (project.parent / "repro.log").write_text(run(project, "dvc", "repro", "-f").stdout)
    return project


def run_twice(reproduced: Path, dest: Path, second_r: int = 4) -> Path:
    """The user's loop on a tiny project: a clone of ``reproduced`` (a committed ``dvc repro``, see
    :func:`reproduce`), then ``dvc exp run -S search.r=<second_r>`` (applied to the workspace and committed).

    Leaves two git commits tagged ``r<first>`` (``reproduced``'s search.r) and ``r<second_r>``, both
    pipelines' outputs in the DVC cache, the DVC experiment on the first commit, and every MLflow run
    in ``dest/mlflow.db``.
    """
    project = clone_project(reproduced, dest)
    run(project, "git", "tag", f"r{read_params(project)['search']['r']}")
    run(project, "dvc", "exp", "run", "-S", f"search.r={second_r}")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", f"search.r={second_r}")
    run(project, "git", "tag", f"r{second_r}")
    return project


def run_documented(reproduced: Path, dest: Path, argv: list[str]) -> Path:
    """A clone of ``reproduced`` after a documented command (e.g. the README's ``dvc exp run -S ...``
    line of a profile), run as written; what it printed (stdout, then stderr) is in ``<dest>/../run.log``."""
    project = clone_project(reproduced, dest)
    done = run(project, *argv)
    (project.parent / "run.log").write_text(done.stdout + done.stderr)
    return project
