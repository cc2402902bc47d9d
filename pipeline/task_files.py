"""The embedded lm-eval tasks as files: one YAML per task next to the eval data it reads.

The corpus stage writes, per domain, ``<domain>_mc.jsonl`` (multiple choice) and
``<domain>_ppl.jsonl`` (rolling perplexity) and beside them ``embedded_<domain>_mc.yaml`` and
``embedded_<domain>_ppl.yaml``, all tagged ``embedded``. That folder is an lm-eval include path:
``lm_eval --include_path outputs/corpus/eval --tasks embedded`` runs exactly what the benchmark
stage runs. lm-eval resolves ``dataset_kwargs.data_files`` against the current directory, not
the YAML's, so the YAMLs name their data by the path the writer is given: the corpus stage gives
it relative to the repository root (no machine path in a DVC output), so lm-eval runs from there.

This module imports nothing heavy: the corpus stage uses it without lm-eval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import yaml

#: The tag (and the ``benchmark.tasks`` token) naming every embedded task.
EMBEDDED = "embedded"
MC_SUFFIX = "_mc.jsonl"
PPL_SUFFIX = "_ppl.jsonl"
KINDS = {"mc": MC_SUFFIX, "ppl": PPL_SUFFIX}


@dataclass(frozen=True)
class EmbeddedTask:
    """One task: its lm-eval name, kind (``mc`` or ``ppl``), domain and data file (as its YAML names it)."""

    name: str
    kind: str
    domain: str
    data_file: PurePath


def mc_task_name(domain: str) -> str:
    """lm-eval name of a domain's multiple-choice task."""
    return f"{EMBEDDED}_{domain}_mc"


def ppl_task_name(domain: str) -> str:
    """lm-eval name of a domain's rolling-perplexity task."""
    return f"{EMBEDDED}_{domain}_ppl"


def task_domain(task: str) -> str:
    """The domain of an embedded task name (``ppl_task_name`` / ``mc_task_name`` inverted); other names as they are."""
    for suffix in ("_ppl", "_mc"):
        if task.startswith(f"{EMBEDDED}_") and task.endswith(suffix):
            return task.removeprefix(f"{EMBEDDED}_").removesuffix(suffix)
    return task


def domain_tasks(domain: str, data_dir: PurePath) -> list[EmbeddedTask]:
    """The multiple-choice and the perplexity task of ``domain`` over ``data_dir``'s files."""
    return [
        EmbeddedTask(mc_task_name(domain), "mc", domain, data_dir / f"{domain}{MC_SUFFIX}"),
        EmbeddedTask(ppl_task_name(domain), "ppl", domain, data_dir / f"{domain}{PPL_SUFFIX}"),
    ]


def task_yaml(task: EmbeddedTask) -> dict[str, Any]:
    """The lm-eval YAML config of one embedded task."""
    common: dict[str, Any] = {
        "task": task.name,
        "tag": [EMBEDDED],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": task.data_file.as_posix()}},
        "test_split": "test",
        "metadata": {"version": 1.0, "domain": task.domain},
    }
    if task.kind == "mc":
        return {
            **common,
            "output_type": "multiple_choice",
            "doc_to_text": "context",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            # contexts are cut mid-text: the true continuation follows without a separator
            "target_delimiter": "",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        }
    return {
        **common,
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
    }


def task_file(directory: Path, task_name: str) -> Path:
    """Where the YAML of ``task_name`` lives in ``directory``."""
    return directory / f"{task_name}.yaml"


def write_task_files(directory: str | Path, domains: Sequence[str], data_dir: str | PurePath) -> list[Path]:
    """Write each domain's task YAMLs into ``directory``, reading data from ``data_dir`` (written as given).

    The same arguments give the same bytes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for domain in domains:
        for task in domain_tasks(domain, PurePath(data_dir)):
            path = task_file(directory, task.name)
            path.write_text(yaml.safe_dump(task_yaml(task), sort_keys=False), encoding="utf-8")
            written.append(path)
    return written
