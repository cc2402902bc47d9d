"""Registry of model adapters, keyed by ``config.model_type``."""

from __future__ import annotations

from typing import Any, TypeVar

from pipeline.errors import PipelineError
from pipeline.models.base import MoEAdapter

_ADAPTERS: dict[str, MoEAdapter] = {}
A = TypeVar("A", bound=type[MoEAdapter])


def register(cls: A) -> A:
    """Class decorator: make an adapter available for each of its ``model_types``."""
    instance = cls()
    for model_type in cls.model_types:
        if model_type in _ADAPTERS:
            raise RuntimeError(f"model type {model_type!r} registered twice")
        _ADAPTERS[model_type] = instance
    return cls


def supported_model_types() -> list[str]:
    """Every model type with an adapter, sorted."""
    _load_families()
    return sorted(_ADAPTERS)


def get_adapter(config: Any) -> MoEAdapter:
    """The adapter for a transformers config; a dense or unknown model is a one-line error."""
    _load_families()
    model_type = getattr(config, "model_type", None)
    candidates = [model_type]
    text = getattr(config, "get_text_config", None)
    if callable(text):
        candidates.append(getattr(text(), "model_type", None))
    for candidate in candidates:
        if candidate in _ADAPTERS:
            return _ADAPTERS[candidate]
    supported = ", ".join(sorted(_ADAPTERS))
    raise PipelineError(
        f"model type {model_type!r} is not a supported Mixture-of-Experts architecture (supported: {supported})"
    )


def families_table() -> str:
    """The supported-families table (Markdown) for docs/models.md, one row per adapter."""
    _load_families()
    header = "| family | `model_type` | routing rule | renormalised? | shared experts | dense layers | notes |"
    rows = [header, "|" + "---|" * 7]
    seen: set[int] = set()
    for model_type in sorted(_ADAPTERS):
        adapter = _ADAPTERS[model_type]
        if id(adapter) in seen:
            continue
        seen.add(id(adapter))
        facts = adapter.describe()
        shared = facts["shared_experts"]
        cells = [
            facts["family"],
            ", ".join(f"`{t}`" for t in facts["model_types"]),
            facts["routing"],
            facts["renormalized"],
            facts.get("shared_doc") or (", ".join(f"`{s}`" for s in shared) if shared else "none"),
            facts["dense_layers"],
            facts["notes"],
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _load_families() -> None:
    # Importing the family modules runs their @register decorators.
    from pipeline.models import families  # noqa: F401
