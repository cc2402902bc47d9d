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

    @property
    def code_deps(self) -> tuple[str, ...]:
        """Deps that are code (not another stage's output)."""
        return tuple(d for d in self.deps if d.endswith(".py") or not d.startswith("outputs/"))


@functools.cache
def _specs(root: str) -> dict[str, StageSpec]:
    dvc_yaml = Path(root) / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise PipelineError(f"{dvc_yaml} does not exist: run stages from the project root (dvc repro <stage>)")
    from dvc.dependency.param import ParamsDependency
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(root, uninitialized=True) as repo:
            stages = list(repo.index.stages)
    except DvcException as exc:
        raise PipelineError(f"{dvc_yaml}: {exc}") from None
    specs: dict[str, StageSpec] = {}
    for st in stages:
        if not hasattr(st, "cmd"):
            continue  # .dvc files tracked outside the pipeline
        params = tuple(
            key for dep in st.deps if isinstance(dep, ParamsDependency) for key in (dep.params or [])
        )
        deps = tuple(str(dep.def_path) for dep in st.deps if not isinstance(dep, ParamsDependency))
        specs[st.name] = StageSpec(
            name=st.name,
            cmd=str(st.cmd),
            deps=deps,
            params=params,
            outs=tuple(str(o.def_path) for o in st.outs),
            cached_outs=tuple(str(o.def_path) for o in st.outs if o.use_cache),
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
