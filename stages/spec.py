"""Each stage's declaration, read from dvc.yaml through DVC's own parser (templating resolved).

dvc.yaml is the one place where a stage's code dependencies, params, upstream outputs and outputs
are written. The harness (stages/common.py) derives from it what a stage may read (its params),
whose runs it descends from (the stages producing its deps), where it writes (the folder of its
``run.json``) and the lineage tags it records.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any

import yaml

from pipeline.errors import PipelineError

RUN_RECORD = "run.json"


@dataclass(frozen=True)
class StageSpec:
    """One stage of dvc.yaml, resolved: ``deps``, ``params`` keys and ``outs`` (metrics and plots included)."""

    name: str
    cmd: str
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]
    cached_outs: tuple[str, ...]

    @property
    def out_dir(self) -> Path:
        """The folder holding the stage's ``run.json`` (every stage writes one; all its outputs live there)."""
        records = [o for o in self.outs if PurePosixPath(o).name == RUN_RECORD]
        if len(records) != 1:
            raise PipelineError(f"dvc.yaml: stage {self.name!r} must declare exactly one {RUN_RECORD} output")
        return Path(PurePosixPath(records[0]).parent)


def _entries(items: list[Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """``(path, options)`` of each entry of a deps/outs/metrics/plots list (``path`` or ``{path: options}``)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for item in items or []:
        if isinstance(item, dict):
            out += [(str(path), dict(options or {})) for path, options in item.items()]
        else:
            out.append((str(item), {}))
    return out


def _params(items: list[Any] | None, name: str) -> tuple[str, ...]:
    keys: list[str] = []
    for item in items or []:
        if isinstance(item, dict):  # {file: [keys]}: only params.yaml holds settings here
            for file, sub in item.items():
                if file != "params.yaml":
                    raise PipelineError(f"dvc.yaml: stage {name!r} reads params from {file}; settings live in params.yaml")
                keys += [str(k) for k in sub or []]
        else:
            keys.append(str(item))
    return tuple(keys)


@functools.cache
def _specs(root: str) -> dict[str, StageSpec]:
    dvc_yaml = Path(root) / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise PipelineError(f"{dvc_yaml} does not exist: run stages from the project root (dvc repro <stage>)")
    # DVC's own resolver (foreach, ${...} from params.yaml), without opening a Repo: that would write
    # DVC's state database, which a stage must not do while `dvc repro` runs it.
    from dvc.fs import LocalFileSystem
    from dvc.parsing import DataResolver

    try:
        raw = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}
        resolved = DataResolver(SimpleNamespace(fs=LocalFileSystem(), config={}), root, raw).resolve()
    except Exception as exc:  # noqa: BLE001 - DVC's parse errors have no common base; report them in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"{dvc_yaml}: {first}") from None
    specs: dict[str, StageSpec] = {}
    for name, body in (resolved.get("stages") or {}).items():
        outs = [*_entries(body.get("outs")), *_entries(body.get("metrics")), *_entries(body.get("plots"))]
        specs[name] = StageSpec(
            name=name,
            cmd=str(body.get("cmd", "")),
            deps=tuple(path for path, _ in _entries(body.get("deps"))),
            params=_params(body.get("params"), name),
            outs=tuple(path for path, _ in outs),
            cached_outs=tuple(path for path, options in outs if options.get("cache", True)),
        )
    return specs


def all_specs(root: Path) -> dict[str, StageSpec]:
    """Every stage of the pipeline by name (``calibration@general`` for a ``foreach`` item)."""
    return _specs(str(Path(root).resolve()))


def spec(name: str, root: Path) -> StageSpec:
    """The stage ``name`` (a one-line error when dvc.yaml has no such stage)."""
    specs = all_specs(root)
    if name not in specs:
        raise PipelineError(f"dvc.yaml has no stage {name!r} (stages: {', '.join(specs)})")
    return specs[name]


def producer(path: str, root: Path) -> str | None:
    """The stage whose output ``path`` is, or lies inside (None for code and other files)."""
    for name, st in all_specs(root).items():
        for out in st.outs:
            if path == out or path.startswith(out + "/"):
                return name
    return None


def upstream(name: str, root: Path) -> tuple[str, ...]:
    """The stages producing ``name``'s deps, in dvc.yaml order."""
    found = {producer(dep, root) for dep in spec(name, root).deps}
    return tuple(n for n in all_specs(root) if n in found and n != name)


def undeclared_code(modules: list[str], st: StageSpec) -> list[str]:
    """The project modules among ``modules`` (paths) that no dep of ``st`` covers."""
    return [m for m in modules if not any(m == d or m.startswith(d.rstrip("/") + "/") for d in st.deps)]


def params_drift(read: set[str], st: StageSpec) -> dict[str, list[str]]:
    """Declared keys the stage never read, and read keys it does not declare (both empty when exact)."""
    declared = set(st.params)
    return {"declared_not_read": sorted(declared - read), "read_not_declared": sorted(read - declared)}
