"""What the evidence scripts in bench/ share: one MLflow run per piece of evidence in a reproduced
project's store, and one-line errors."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.tracking import StageRun, default_artifact_root, default_tracking_uri


def log_evidence_run(project: Path, name: str, experiment: str, script: str, *, params: Mapping[str, Any],
                     metrics: Mapping[str, float], files: list[Path], enabled: bool = True) -> str | None:
    """One MLflow run ``name`` in ``project``'s store (tagged with the script and the model stage's run)
    with ``params``, ``metrics`` and ``files`` as artifacts; its id (None when tracking is off)."""
    uri = default_tracking_uri(project)
    model_run = read_json(project / "outputs/model/run.json", what="model stage record").get("run_id")
    with StageRun(name, experiment, uri, artifact_root=default_artifact_root(uri, project), params=dict(params),
                  tags={"script": script, "upstream.model": model_run}, enabled=enabled) as run:
        run.log_metrics(dict(metrics))
        for path in files:
            run.log_artifact(path)
        return run.run_id


def cli(main: Callable[[], Any]) -> None:
    """Run ``main``; a bad project, file or param ends it with one line on stderr and exit status 2."""
    try:
        main()
    except (PipelineError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
