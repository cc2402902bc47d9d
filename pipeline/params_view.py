"""A read-only view of the validated params that refuses keys a stage did not declare.

A DVC stage reruns only when one of its declared params changes, so a stage that reads an
undeclared key would silently go stale. :class:`ParamsView` makes that impossible: reading a key
outside the declared ones (and outside :data:`RESULT_NEUTRAL`) raises :class:`UndeclaredParam`, and
every declared key that is read is recorded, so a test can check the declaration is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from pipeline.errors import PipelineError

#: Settings that cannot change any output a stage writes, so no stage declares them and changing
#: them reruns nothing. Each with the reason.
RESULT_NEUTRAL: dict[str, str] = {
    "tracking.experiment": "names the MLflow experiment the runs are filed under; outputs do not record it",
    "tracking.enabled": "turns MLflow logging on or off; outputs are written either way",
    "runtime.threads": "CPU threads of torch: speed only (sums may round differently in the last bit)",
    "runtime.offload": "whether decoder layers are read from the checkpoint one at a time: memory, not values",
}


class UndeclaredParam(PipelineError):
    """A stage read a params key that its dvc.yaml entry does not declare."""


def covering(path: str, keys: Iterable[str]) -> str | None:
    """The key among ``keys`` that equals ``path`` or is an ancestor of it (None if none)."""
    for key in keys:
        if path == key or path.startswith(key + "."):
            return key
    return None


def is_prefix(path: str, keys: Iterable[str]) -> bool:
    """True when some key lies strictly below ``path``."""
    return any(key.startswith(path + ".") for key in keys)


class ParamsView:
    """Attribute and item access to a params object, limited to ``declared`` keys.

    A declared (or result-neutral) key returns the real value (a pydantic section, a list, a
    scalar); a key above declared ones returns a narrower view; any other key raises
    :class:`UndeclaredParam` naming the key and the stage.
    """

    __slots__ = ("_obj", "_path", "_declared", "_reads", "_stage")

    def __init__(
        self, obj: Any, declared: Iterable[str], *, stage: str, path: str = "", reads: set[str] | None = None
    ) -> None:
        self._obj = obj
        self._path = path
        self._declared = tuple(declared)
        self._reads: set[str] = set() if reads is None else reads
        self._stage = stage

    @property
    def reads(self) -> set[str]:
        """The declared keys read so far (shared by every view derived from this one)."""
        return self._reads

    def _child(self, name: str, value: Any) -> Any:
        path = f"{self._path}.{name}" if self._path else name
        key = covering(path, self._declared)
        if key is not None:
            self._reads.add(key)
            return value
        if covering(path, RESULT_NEUTRAL) is not None:
            return value
        if is_prefix(path, [*self._declared, *RESULT_NEUTRAL]):
            return ParamsView(value, self._declared, stage=self._stage, path=path, reads=self._reads)
        raise UndeclaredParam(
            f"{path}: stage {self._stage!r} reads this param but dvc.yaml does not declare it in the "
            "stage's params (add it there, or to pipeline.params_view.RESULT_NEUTRAL with a reason)"
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._child(name, getattr(self._obj, name))

    def __getitem__(self, key: str) -> Any:
        if not isinstance(self._obj, Mapping):
            raise TypeError(f"{self._path or 'params'} is not a mapping")
        if key not in self._obj:
            raise KeyError(key)
        return self._child(key, self._obj[key])

    def __repr__(self) -> str:
        return f"ParamsView({self._path or 'params'}, declared={list(self._declared)})"


def declared_values(params: BaseModel, keys: Iterable[str]) -> dict[str, Any]:
    """``key -> value`` (JSON form) of each dotted key; a missing key is an error naming it."""
    dump = params.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = dump
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise PipelineError(f"dvc.yaml declares param {key!r}, which params.yaml does not have")
            node = node[part]
        out[key] = node
    return out
