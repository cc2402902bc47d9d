"""MLflow tracking: one run per stage execution, with params, metrics, small artifacts and lineage tags.

This is the only module that imports mlflow. Large artifacts (checkpoints, caches) are logged by
reference (path and content hash as tags), never copied into the artifact store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

ENV_URI = "MLFLOW_TRACKING_URI"
MAX_PARAM_CHARS = 500

# Fail fast instead of MLflow's default minutes of retries against a dead server.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def default_tracking_uri(root: str | os.PathLike[str]) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite store ``mlflow.db`` in ``root``."""
    env = os.environ.get(ENV_URI)
    if env:
        return env
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def is_server_uri(uri: str) -> bool:
    """True for a tracking server (``http(s)://``, Databricks), whose artifact root is its own."""
    return uri.startswith(("http://", "https://", "databricks"))


def default_artifact_root(uri: str, root: str | os.PathLike[str]) -> Path | None:
    """Where a new experiment keeps its artifacts: ``<root>/mlartifacts`` beside a local store
    (SQLite, file, direct database), None for a tracking server so that the server's own
    default artifact root (``--artifacts-destination``, proxied) applies."""
    return None if is_server_uri(uri) else Path(root).resolve() / "mlartifacts"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise a one-line error when an HTTP tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - user-given tracking URI
            if resp.status >= 400:
                raise PipelineError(f"MLflow tracking server {uri} answered HTTP {resp.status} (MLFLOW_TRACKING_URI)")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PipelineError(f"MLflow tracking server {uri} is unreachable (MLFLOW_TRACKING_URI): {reason}") from None


def _clip(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def _metric_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


class StageRun:
    """An MLflow run for one stage execution; ends FINISHED, or FAILED when the block raises.

    With ``enabled=False`` every logging call is a no-op and ``run_id`` is None.
    """

    def __init__(
        self,
        stage: str,
        experiment: str,
        tracking_uri: str,
        *,
        artifact_root: str | os.PathLike[str] | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        enabled: bool = True,
        run_name: str | None = None,
    ) -> None:
        self.stage = stage
        self.experiment = experiment
        self.tracking_uri = tracking_uri
        self.artifact_root = Path(artifact_root).resolve() if artifact_root else None
        self.enabled = enabled
        self.run_name = run_name or stage
        self._params = dict(params or {})
        self._tags = dict(tags or {})
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._mlflow: Any = None

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> StageRun:
        if not self.enabled:
            return self
        check_reachable(self.tracking_uri)
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.tracking_uri)
        try:
            exp = mlflow.get_experiment_by_name(self.experiment)
            if exp is None:
                location = self.artifact_root.as_uri() if self.artifact_root else None
                self.experiment_id = mlflow.create_experiment(self.experiment, artifact_location=location)
            else:
                self.experiment_id = exp.experiment_id
            run = mlflow.start_run(
                experiment_id=self.experiment_id,
                run_name=self.run_name,
                tags={"stage": self.stage, **{k: _clip(v) for k, v in self._tags.items()}},
            )
        except PipelineError:
            raise
        except Exception as exc:  # the store itself is broken or unreachable
            raise PipelineError(f"cannot use MLflow store {self.tracking_uri}: {type(exc).__name__}: {exc}") from None
        self.run_id = run.info.run_id
        self.log_params(self._params)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.enabled or self._mlflow is None:
            return
        status = "FINISHED" if exc_type is None else "FAILED"
        if exc is not None:
            with contextlib.suppress(Exception):
                self._mlflow.set_tag("error", _clip(f"{exc_type.__name__}: {exc}"))
        while self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)

    @contextlib.contextmanager
    def child(self, name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> Iterator[ChildRun]:
        """A nested run (for example one benchmark variant), FAILED when its block raises."""
        if not self.enabled:
            yield ChildRun(None, None)
            return
        mlflow = self._mlflow
        run = mlflow.start_run(
            experiment_id=self.experiment_id,
            run_name=name,
            nested=True,
            tags={"stage": self.stage, "variant": name, **{k: _clip(v) for k, v in (tags or {}).items()}},
        )
        child = ChildRun(mlflow, run.info.run_id)
        child.log_params(params or {})
        try:
            yield child
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise
        mlflow.end_run(status="FINISHED")

    # -- logging ---------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values clipped to MLflow's limits)."""
        if self.enabled and params:
            items = {k: _clip(v) for k, v in params.items()}
            keys = list(items)
            for i in range(0, len(keys), 90):
                self._mlflow.log_params({k: items[k] for k in keys[i : i + 90]})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics; non-finite and non-numeric values are skipped."""
        if not self.enabled:
            return
        clean = {_metric_key(k): float(v) for k, v in metrics.items() if _is_number(v)}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags."""
        if self.enabled and tags:
            self._mlflow.set_tags({k: _clip(v) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a small file (JSON, plot, table) into the run's artifacts."""
        if self.enabled and Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_text(self, text: str, name: str) -> None:
        """Store a text artifact under ``name``."""
        if self.enabled:
            self._mlflow.log_text(text, name)

    def log_figure(self, figure: Any, name: str) -> None:
        """Store a matplotlib figure as an image artifact."""
        if self.enabled:
            self._mlflow.log_figure(figure, name)

    def log_reference(self, name: str, path: str | os.PathLike[str], digest: str | None = None) -> None:
        """Record a large artifact by reference: its path and content hash, as tags."""
        tags = {f"artifact.{name}.path": str(path)}
        if digest:
            tags[f"artifact.{name}.md5"] = digest
        self.set_tags(tags)


class ChildRun:
    """Logging handle of a nested run."""

    def __init__(self, mlflow: Any, run_id: str | None) -> None:
        self._mlflow = mlflow
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params on the child run."""
        if self._mlflow is not None and params:
            self._mlflow.log_params({k: _clip(v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Log numeric metrics on the child run."""
        if self._mlflow is not None:
            clean = {_metric_key(k): float(v) for k, v in metrics.items() if _is_number(v)}
            if clean:
                self._mlflow.log_metrics(clean)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a small file into the child run's artifacts."""
        if self._mlflow is not None and Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        f = float(value)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))


def write_temp_text(text: str, name: str) -> Path:
    """Write ``text`` to a fresh temporary file called ``name`` (for artifacts built in memory)."""
    folder = Path(tempfile.mkdtemp(prefix="mlflow-artifact-"))
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path
