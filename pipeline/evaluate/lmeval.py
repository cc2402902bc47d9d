"""Accuracy and perplexity through lm-evaluation-harness, on an in-memory model or (vllm) a checkpoint.

The in-memory path wraps the loaded model in lm-eval's ``HFLM``, so anything patched into the
model (dynamic expert skipping) is what lm-eval measures. lm-eval's whole result dict is kept
(less its per-sample log); :func:`task_metrics` reduces it to ``{task: {metric: value}}`` for the
metrics file, and :func:`item_scores` reduces the per-sample log to each document's scores, from
which the report's intervals and paired comparisons are computed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.evaluate.tasks import EMBEDDED, TaskSelection

log = logging.getLogger(__name__)

#: Metrics whose value is an accuracy in [0, 1] (the report's task columns and the average).
ACCURACY_METRICS = ("acc", "acc_norm", "exact_match", "exact_match_strict-match", "exact_match_flexible-extract")
#: The accuracy reported for a task: the first of these it has (lm-eval's usual reporting choice).
PRIMARY_BY_TASK = {
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "openbookqa": "acc_norm",
    "gsm8k": "exact_match_strict-match",
}
PRIMARY_DEFAULT = ("acc", "exact_match_strict-match", "exact_match", "acc_norm")
#: Perplexity-type metrics (lower is better), reported in their own table.
PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


@dataclass
class PreparedTasks:
    """lm-eval task and group objects ready to run, and the report rows they produce, in order."""

    objects: list[Any]
    rows: list[str]


def _load_one(manager: Any, name: str) -> dict[str, Any]:
    try:
        return manager.load([name])
    except (ConnectionError, FileNotFoundError, OSError) as exc:
        raise PipelineError(
            f"benchmark.tasks: cannot load the data of lm-eval task {name!r} offline ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); cache it once with HF_DATASETS_OFFLINE=0 "
            "HF_HUB_OFFLINE=0 and network access, or drop the task"
        ) from None


def prepare_tasks(selection: TaskSelection, num_fewshot: Mapping[str, int] | None = None) -> PreparedTasks:
    """Build the selected tasks, each leaf with its few-shot count from ``num_fewshot``.

    ``num_fewshot`` is keyed by a leaf task, a requested name (a group or tag applies to all of
    its tasks) or ``embedded``; tasks without an entry keep their YAML default (zero when unset).
    A key that matches nothing selected is a one-line error.
    """
    num_fewshot = dict(num_fewshot or {})
    embedded_names = {t.name for t in selection.embedded}
    used: set[str] = set()
    objects: list[Any] = []
    rows: list[str] = []
    for spec in selection.spec_names():
        loaded = _load_one(selection.manager, spec)
        groups = loaded.get("groups") or {}
        leaves = loaded["tasks"]
        objects.extend([groups[spec]] if spec in groups else list(leaves.values()))
        rows.extend([spec] if spec in groups else list(leaves))
        for leaf_name, task in leaves.items():
            for key in (leaf_name, spec, EMBEDDED if spec in embedded_names else None):
                if key is not None and key in num_fewshot:
                    task.set_config(key="num_fewshot", value=int(num_fewshot[key]))
                    used.add(key)
                    break
        used.update(k for k in num_fewshot if k in leaves)
    extra = sorted(set(num_fewshot) - used)
    if extra:
        raise PipelineError(f"benchmark.num_fewshot: {', '.join(map(repr, extra))} not among the selected tasks")
    return PreparedTasks(objects=objects, rows=list(dict.fromkeys(rows)))


@dataclass
class ItemScores:
    """One report row's per-document scores, in a stable order (by subtask, then lm-eval's doc id).

    ``scores`` maps an accuracy-type metric (named as in :func:`task_metrics`) to each document's
    value; a rolling-perplexity task has each document's log-likelihood and word and byte counts.
    """

    doc_ids: list[str]
    scores: dict[str, list[float]] = field(default_factory=dict)
    loglikelihood: list[float] | None = None
    words: list[int] | None = None
    bytes: list[int] | None = None

    def counts(self, metric: str) -> list[int] | None:
        """The per-document counts a perplexity metric divides by (words or bytes)."""
        return self.words if metric == "word_perplexity" else self.bytes

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (fields left out when absent)."""
        return {k: v for k, v in vars(self).items() if v is not None and v != {}}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ItemScores:
        """Inverse of :meth:`to_json`."""
        return cls(
            doc_ids=[str(d) for d in doc["doc_ids"]],
            scores={k: [float(x) for x in v] for k, v in (doc.get("scores") or {}).items()},
            loglikelihood=doc.get("loglikelihood"),
            words=doc.get("words"),
            bytes=doc.get("bytes"),
        )


def _leaves(name: str, group_subtasks: Mapping[str, Sequence[str]]) -> list[str]:
    if name not in group_subtasks:
        return [name]
    return [leaf for sub in group_subtasks[name] for leaf in _leaves(sub, group_subtasks)]


def _doc_order(doc_id: Any) -> tuple[int, Any]:
    return (0, doc_id) if isinstance(doc_id, int) else (1, str(doc_id))


def item_scores(results: Mapping[str, Any], rows: Sequence[str]) -> dict[str, ItemScores]:
    """Per-document scores of each report row from lm-eval's ``samples`` (``log_samples=True``).

    A group row (e.g. ``mmlu``) holds the documents of all its subtasks (``<subtask>:<doc id>``),
    whose mean is lm-eval's size-weighted group score. Rows without logged samples are left out.
    """
    samples = results.get("samples") or {}
    groups = results.get("group_subtasks") or {}
    out: dict[str, ItemScores] = {}
    for row in rows:
        leaves = [leaf for leaf in _leaves(row, groups) if leaf in samples]
        if not leaves:
            continue
        docs: dict[tuple[int, tuple[int, Any]], dict[str, Any]] = {}
        for index, leaf in enumerate(leaves):
            for sample in samples[leaf]:
                doc_id = sample["doc_id"]
                key = (index, _doc_order(doc_id))
                entry = docs.setdefault(key, {"id": f"{leaf}:{doc_id}" if row in groups else str(doc_id)})
                for metric in sample.get("metrics", ()):
                    value = sample.get(metric)
                    if metric in PERPLEXITY_METRICS and isinstance(value, list | tuple) and len(value) == 2:
                        entry["loglikelihood"] = float(value[0])
                        entry["words" if metric == "word_perplexity" else "bytes"] = int(value[1])
                    elif isinstance(value, int | float):  # one sample per filter: the metric is named with it
                        name = _metric_name(f"{metric},{sample.get('filter', 'none')}")
                        entry.setdefault("scores", {})[name] = float(value)
        ordered = [docs[k] for k in sorted(docs)]
        items = ItemScores(doc_ids=[d["id"] for d in ordered])
        names = dict.fromkeys(m for d in ordered for m in d.get("scores", {}))
        items.scores = {
            m: [d["scores"][m] for d in ordered] for m in names if all(m in d.get("scores", {}) for d in ordered)
        }
        for attr in ("loglikelihood", "words", "bytes"):
            if all(attr in d for d in ordered):
                setattr(items, attr, [d[attr] for d in ordered])
        out[row] = items
    return out


@dataclass
class Evaluation:
    """lm-eval's result dict (JSON, without the per-sample log), the report rows, per-document scores."""

    raw: dict[str, Any]
    rows: list[str]
    items: dict[str, ItemScores]


def _finish(results: dict[str, Any] | None, rows: list[str]) -> Evaluation:
    if results is None:
        raise PipelineError("lm-eval returned no results (is this process a non-zero distributed rank?)")
    items = item_scores(results, rows)
    results.pop("samples", None)
    # round-trip through lm-eval's own serialiser so the dict is plain JSON
    from lm_eval.utils import handle_non_serializable

    return Evaluation(json.loads(json.dumps(results, default=handle_non_serializable)), rows, items)


def evaluate_model(
    model: Any,
    tokenizer: Any,
    selection: TaskSelection,
    *,
    batch_size: int,
    limit: int | None = None,
    num_fewshot: Mapping[str, int] | None = None,
    max_length: int | None = None,
) -> Evaluation:
    """Run the selected tasks on an in-memory causal LM."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    prepared = prepare_tasks(selection, num_fewshot)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    results = simple_evaluate(
        model=lm,
        tasks=prepared.objects,
        task_manager=selection.manager,
        limit=limit,
        log_samples=True,
        bootstrap_iters=1000,
    )
    return _finish(results, prepared.rows)


def vllm_available() -> bool:
    """Whether vllm can be imported."""
    return importlib.util.find_spec("vllm") is not None


#: lm-eval ``VLLM`` arguments the pipeline sets itself (``benchmark.vllm_args`` may not override them).
VLLM_RESERVED = ("pretrained", "dtype", "trust_remote_code")


def vllm_model_args(
    path: str | Path, *, dtype: str, trust_remote_code: bool = False, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``model_args`` for lm-eval's vllm backend: the checkpoint, dtype and ``benchmark.vllm_args``."""
    clash = sorted(set(extra or {}) & set(VLLM_RESERVED))
    if clash:
        raise PipelineError(f"benchmark.vllm_args: {', '.join(clash)} are set by the pipeline (runtime.dtype, the variant's checkpoint)")
    args: dict[str, Any] = {"pretrained": str(path), "dtype": dtype, "trust_remote_code": trust_remote_code}
    args.update({k: v for k, v in (extra or {}).items() if v is not None})
    return args


def evaluate_checkpoint_vllm(
    path: str | Path,
    selection: TaskSelection,
    *,
    dtype: str,
    batch_size: int,
    limit: int | None = None,
    num_fewshot: Mapping[str, int] | None = None,
    trust_remote_code: bool = False,
    model_args: Mapping[str, Any] | None = None,
) -> Evaluation:
    """Run the selected tasks on a saved checkpoint through lm-eval's vllm backend.

    ``model_args`` (``benchmark.vllm_args``) are passed on to lm-eval's ``VLLM`` model, e.g.
    ``tensor_parallel_size`` to spread a model larger than one GPU over several.
    """
    if not vllm_available():
        raise PipelineError("benchmark.backend: vllm is not installed (pip install vllm) - use backend: hf")
    from lm_eval import simple_evaluate

    prepared = prepare_tasks(selection, num_fewshot)
    args = vllm_model_args(path, dtype=dtype, trust_remote_code=trust_remote_code, extra=model_args)
    results = simple_evaluate(
        model="vllm",
        model_args=args,
        tasks=prepared.objects,
        task_manager=selection.manager,
        batch_size=batch_size,
        limit=limit,
        log_samples=True,
        bootstrap_iters=1000,
    )
    return _finish(results, prepared.rows)


def _metric_name(key: str) -> str:
    name, _, filt = key.partition(",")
    return name if filt in ("", "none") else f"{name}_{filt}"


def task_metrics(results: Mapping[str, Any], rows: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for each report row, from lm-eval's result dict.

    Metric keys drop lm-eval's ``,none`` filter suffix (other filters become ``_<filter>``);
    standard errors are kept as ``<metric>_stderr``; non-numeric and non-finite values are dropped.
    """
    tables = [results.get("results") or {}, results.get("groups") or {}]
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        entry = next((t[row] for t in tables if row in t), None)
        if entry is None:
            raise PipelineError(f"lm-eval returned no result for task {row!r}")
        metrics: dict[str, float] = {}
        for key, value in entry.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(float(value)):
                metrics[_metric_name(key)] = float(value)
        out[row] = metrics
    return out


def primary_metric(task: str, metrics: Mapping[str, float]) -> str | None:
    """The accuracy metric reported for ``task`` (None for a perplexity-only task)."""
    preferred = PRIMARY_BY_TASK.get(task)
    for name in ((preferred,) if preferred else ()) + PRIMARY_DEFAULT:
        if name in metrics:
            return name
    return None


def average_accuracy(tasks: Mapping[str, Mapping[str, float]]) -> float | None:
    """Mean of the tasks' primary accuracies (tasks without one are left out); None without any."""
    values = [m[p] for t, m in tasks.items() if (p := primary_metric(t, m)) is not None]
    return sum(values) / len(values) if values else None
