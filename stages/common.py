"""What every DVC stage script shares: params, the MLflow run with lineage tags, atomic outputs.

A stage script is ``@stage(name)`` on a function taking a :class:`StageContext`; everything else
about the stage (its params, deps, upstream stages, output folder) comes from its dvc.yaml entry
(stages/spec.py). The harness validates the whole params.yaml before any work, hands the stage a
view of only the params it declares (reading any other key is an error), opens one MLflow run
(FAILED when the stage raises), gives the stage a temporary output directory that replaces its
output folder only on success, writes ``run.json`` there (read by downstream stages for lineage,
with the params the stage read), and turns user errors into one line on stderr with exit status 2.
A ``foreach`` stage gets its item as the command's argument (``python -m stages.calibration arith``
is ``calibration@arith``).
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import flatten, load_params
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, read_json, write_json
from pipeline.params_view import ParamsView, declared_values
from pipeline.tracking import StageRun, default_artifact_root, default_tracking_uri
from stages import spec as specs

ROOT = Path.cwd()
OUTPUTS = Path("outputs")
WORK = OUTPUTS / ".work"
#: Paths whose changes do not make the working tree "dirty" for lineage: what ``dvc repro`` writes itself.
NOT_SOURCE = ("dvc.lock", "outputs")
log = logging.getLogger("stages")


@dataclass
class StageContext:
    """What a stage function gets: its declared params, its item (``foreach``), its temporary output dir, the MLflow run."""

    name: str
    params: ParamsView
    out: Path
    run: StageRun
    item: str | None = None
    upstream_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    after_commit: list[Callable[[], None]] = field(default_factory=list)

    def work_dir(self, key: Any) -> Path:
        """A resumable scratch directory for this stage, named by the hash of ``key`` (its inputs)."""
        from pipeline.io import scratch_dir

        return scratch_dir(WORK / self.name.replace("@", "-"), key)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log metrics to MLflow and keep them for ``metrics.json``."""
        if step is None:
            self.metrics.update(metrics)
        self.run.log_metrics(metrics, step=step)


def stage_dir(stage: str) -> Path:
    """The output folder of a stage (``calibration@general`` for one calibration set), from dvc.yaml."""
    return specs.spec(stage, ROOT).out_dir


def check_exported_from(exported: Path, fingerprint: str) -> None:
    """Refuse an exported checkpoint that was not pruned from the model stage's model (``fingerprint``)."""
    pruning = read_json(exported / "config.json", what="exported model config").get("pruning") or {}
    if pruning.get("source_fingerprint") != fingerprint:
        raise PipelineError(
            f"{exported}: exported from model {pruning.get('source_fingerprint')}, the model stage's is "
            f"{fingerprint} (rerun: dvc repro export)"
        )


def calibration_dir(name: str) -> Path:
    """The output folder of the calibration set ``name``."""
    return stage_dir(f"calibration@{name}")


# -- lineage -------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_tags() -> dict[str, str]:
    """Commit, dirty flag (changes to tracked sources; dvc.lock and outputs/ are DVC's) and DVC experiment."""
    tags: dict[str, str] = {}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["git.commit"] = commit
        status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":!{p}" for p in NOT_SOURCE))
        tags["git.dirty"] = str(bool(status))
    for env in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT"):
        if os.environ.get(env):
            tags[f"dvc.{env.lower()}"] = os.environ[env]
    return tags


def file_md5(path: Path) -> str:
    """MD5 of a file's content (DVC 3's file hash)."""
    digest = hashlib.md5()  # noqa: S324 - matches DVC's content hash, not used for security
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def dvc_md5(path: Path) -> str | None:
    """The hash DVC records for a file or directory (``<md5>.dir`` for directories)."""
    if path.is_file():
        return file_md5(path)
    if not path.is_dir():
        return None
    entries = [
        {"md5": file_md5(p), "relpath": p.relative_to(path).as_posix()}
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".gitignore"
    ]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"  # noqa: S324


def lock_hashes() -> dict[str, str]:
    """``path -> md5`` of every out recorded in dvc.lock (what upstream stages produced)."""
    path = ROOT / "dvc.lock"
    if not path.is_file():
        return {}
    lock = yaml.safe_load(path.read_text()) or {}
    hashes: dict[str, str] = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if "md5" in out:
                hashes[out["path"]] = out["md5"]
    return hashes


def dep_tags(st: specs.StageSpec) -> dict[str, str]:
    """``dvc.dep.<path>`` tags: dvc.lock's hash for upstream outputs, a fresh DVC hash for code."""
    recorded = lock_hashes()
    tags: dict[str, str] = {}
    for dep in st.deps:
        digest = recorded.get(dep) or dvc_md5(ROOT / dep)
        if digest:
            tags[f"dvc.dep.{dep}"] = digest
    return tags


def out_tags(st: specs.StageSpec) -> dict[str, str]:
    """``dvc.out.<path>`` tags: the DVC hash of every output the stage declares."""
    return {f"dvc.out.{out}": digest for out in st.outs if (digest := dvc_md5(ROOT / out))}


def read_upstream(stages: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``run.json`` of each upstream stage (a missing one means that stage never completed)."""
    found: dict[str, dict[str, Any]] = {}
    for up in stages:
        path = stage_dir(up) / specs.RUN_RECORD
        if not path.is_file():
            raise PipelineError(f"{path} does not exist: run the {up!r} stage first (dvc repro {up})")
        found[up] = read_json(path, what="upstream run record")
    return found


def tag_key(stage: str) -> str:
    """A stage name as MLflow accepts it in tag keys (``calibration@arith`` -> ``calibration/arith``)."""
    return stage.replace("@", "/")


# -- the harness ---------------------------------------------------------------------------------
def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "httpx", "urllib3", "datasets", "filelock", "fsspec", "dvc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def stage(name: str) -> Callable[[Callable[[StageContext], None]], Callable[[], None]]:
    """Decorator turning ``fn(ctx)`` into the stage's ``main()``; a ``foreach`` item comes as ``argv[1]``."""

    def decorate(fn: Callable[[StageContext], None]) -> Callable[[], None]:
        @functools.wraps(fn)
        def main() -> None:
            _setup_logging()
            item = sys.argv[1] if len(sys.argv) > 1 else None
            full = f"{name}@{item}" if item else name
            try:
                _run(full, item, fn)
            except PipelineError as exc:
                print(f"error: {full}: {exc}", file=sys.stderr)
                sys.exit(2)
            except KeyboardInterrupt:
                print(f"error: {full}: interrupted", file=sys.stderr)
                sys.exit(130)

        return main

    return decorate


def _run(name: str, item: str | None, fn: Callable[[StageContext], None]) -> None:
    started = time.time()
    params = load_params("params.yaml")  # the file dvc.yaml's ${...} are resolved from
    st = specs.spec(name, ROOT)
    view = ParamsView(params, st.params, stage=name)
    from pipeline.runtime import configure_threads

    configure_threads(params.runtime.threads)
    if params.runtime.trust_remote_code:
        log.warning("runtime.trust_remote_code is true: transformers may run code from the model's repository")
    ups = read_upstream(specs.upstream(name, ROOT))
    flat: dict[str, Any] = {}
    for key, value in declared_values(params, st.params).items():
        flat.update(flatten(value, f"{key}."))
    tags = {**git_tags(), **dep_tags(st), "model.source": params.model.source}
    for up, record in ups.items():
        if record.get("run_id"):
            tags[f"upstream.{tag_key(up)}.run_id"] = record["run_id"]
    uri = default_tracking_uri(ROOT)
    run = StageRun(
        name,
        params.tracking.experiment,
        uri,
        artifact_root=default_artifact_root(uri, ROOT),
        params=flat,
        tags=tags,
        enabled=params.tracking.enabled,
    )
    final = st.out_dir
    with run:
        with atomic_dir(final) as tmp:
            ctx = StageContext(name=name, params=view, out=tmp, run=run, item=item, upstream_runs=ups)
            fn(ctx)
            if ctx.metrics and not (tmp / "metrics.json").exists():
                write_json(tmp / "metrics.json", ctx.metrics)
            record = {
                "stage": name,
                "run_id": run.run_id,
                "experiment_id": run.experiment_id,
                "experiment": params.tracking.experiment,
                "tracking_uri": run.tracking_uri if run.enabled else None,
                "upstream": {up: rec.get("run_id") for up, rec in ups.items()},
                "params_read": sorted(view.reads),
                "git_commit": tags.get("git.commit"),
                "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "seconds": round(time.time() - started, 2),
            }
            write_json(tmp / specs.RUN_RECORD, record)
        for callback in ctx.after_commit:  # e.g. deleting the stage's resumable work directory
            callback()
        run.set_tags(out_tags(st))
        run.log_metrics({"stage_seconds": time.time() - started})
    log.info("%s done in %.1fs -> %s", name, time.time() - started, final)
