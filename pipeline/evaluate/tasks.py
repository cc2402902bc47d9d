"""lm-eval task selection: our embedded tasks (the corpus stage's task files) and lm-eval's own.

The token ``embedded`` in a task list stands for one multiple-choice task and one rolling
perplexity task per corpus domain: the YAML files the corpus stage writes next to its eval data
(:mod:`pipeline.task_files`), used as they are as lm-eval's include path, so the ``lm_eval`` CLI
with ``--include_path outputs/corpus/eval`` runs what the benchmark runs. Every other name is
looked up in lm-eval's TaskManager (tasks, groups and tags).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import yaml

from pipeline.errors import PipelineError
from pipeline.task_files import (
    EMBEDDED,
    MC_SUFFIX,
    PPL_SUFFIX,
    EmbeddedTask,
    domain_tasks,
    mc_task_name,
    ppl_task_name,
    task_file,
)

__all__ = [
    "EMBEDDED",
    "MC_SUFFIX",
    "PAPER",
    "PAPER_TASKS",
    "PPL_SUFFIX",
    "EmbeddedTask",
    "TaskSelection",
    "embedded_tasks",
    "expand_presets",
    "mc_task_name",
    "ppl_task_name",
    "select_tasks",
]

log = logging.getLogger(__name__)

#: The ``benchmark.tasks`` token for the paper's evaluation (Lu et al. 2024, Table 1).
PAPER = "paper"
PAPER_TASKS = ("boolq", "rte", "arc_challenge", "arc_easy", "hellaswag", "winogrande", "openbookqa", "mmlu", "gsm8k")
#: Few-shot counts of the paper's protocol (every other task zero-shot).
PAPER_FEWSHOT = {"gsm8k": 5}
#: Where users find valid lm-eval task names.
LIST_HINT = "list valid names with `lm-eval ls tasks`; 'embedded' = the corpus stage's tasks, 'paper' = the paper's"
_REQUIRED = {
    "mc": {"id": str, "context": str, "choices": list, "label": int},
    "ppl": {"id": str, "text": str},
}


def discover_domains(eval_dir: Path) -> list[str]:
    """Domains that have a multiple-choice or a perplexity file in ``eval_dir``, sorted."""
    names = set()
    for suffix in (MC_SUFFIX, PPL_SUFFIX):
        names.update(p.name[: -len(suffix)] for p in eval_dir.glob(f"*{suffix}"))
    return sorted(names)


def _check_records(path: Path, required: dict[str, type | tuple[type, ...]]) -> int:
    """Count the records of a jsonl file, checking each has the documented fields; one-line errors."""
    if not path.is_file():
        raise PipelineError(f"{path}: embedded benchmark data is missing (run the corpus stage: dvc repro corpus)")
    count = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            for key, kind in required.items():
                if not isinstance(rec, dict) or not isinstance(rec.get(key), kind):
                    raise PipelineError(f"{path}:{lineno}: field {key!r} is missing or has the wrong type")
            if "label" in required and not 0 <= rec["label"] < len(rec["choices"]):
                raise PipelineError(f"{path}:{lineno}: label {rec['label']} is not an index into choices")
            count += 1
    if count == 0:
        raise PipelineError(f"{path}: embedded benchmark data is empty (check corpus.eval.*)")
    return count


def _data_file_of(yaml_file: Path, expected: Path) -> PurePath:
    """The data file ``yaml_file`` names, checked to be ``expected`` as seen from the current directory."""
    if not yaml_file.is_file():
        raise PipelineError(f"{yaml_file}: lm-eval task file is missing (run the corpus stage: dvc repro corpus)")
    try:
        config = yaml.safe_load(yaml_file.read_text(encoding="utf-8"))
        named = PurePath(config["dataset_kwargs"]["data_files"]["test"])
    except (yaml.YAMLError, TypeError, KeyError) as exc:
        raise PipelineError(
            f"{yaml_file}: not an embedded task file ({type(exc).__name__}); rerun the corpus stage: dvc repro corpus"
        ) from None
    if Path(named).resolve() != expected:
        raise PipelineError(
            f"{yaml_file}: reads {named}, which from {Path.cwd()} is not {expected} "
            "(lm-eval resolves it against the current directory: run from the repository root)"
        )
    return named


def embedded_tasks(eval_dir: str | Path, domains: Sequence[str] | None = None) -> list[EmbeddedTask]:
    """The embedded tasks in ``eval_dir``, after checking every data file and task file.

    Each data file must exist and be well formed, and each task YAML must exist and name that
    file as lm-eval will find it from the current directory. ``domains`` defaults to every domain
    with a data file in ``eval_dir``.
    """
    eval_dir = Path(eval_dir).resolve()
    domains = list(domains) if domains is not None else discover_domains(eval_dir)
    if not domains:
        raise PipelineError(
            f"{eval_dir / ('<domain>' + MC_SUFFIX)}: no embedded benchmark data (run: dvc repro corpus)"
        )
    tasks: list[EmbeddedTask] = []
    for domain in domains:
        for task in domain_tasks(domain, eval_dir):
            data = Path(task.data_file)
            _check_records(data, _REQUIRED[task.kind])
            named = _data_file_of(task_file(eval_dir, task.name), data)
            tasks.append(EmbeddedTask(task.name, task.kind, domain, named))
    return tasks


@dataclass
class TaskSelection:
    """What to hand lm-eval: a TaskManager over the right paths and the task specs to run.

    ``report_names`` are the rows of the report in order: each requested lm-eval name (a group
    such as ``mmlu`` stays one row) with ``embedded`` expanded into its tasks.
    """

    requested: list[str]
    report_names: list[str]
    embedded: list[EmbeddedTask] = field(default_factory=list)
    include_dir: Path | None = None
    manager: Any = None

    def spec_names(self) -> list[str]:
        """The names passed to lm-eval, ``embedded`` replaced by its task names."""
        out: list[str] = []
        for name in self.requested:
            out.extend(t.name for t in self.embedded) if name == EMBEDDED else out.append(name)
        return out


def expand_presets(
    names: Sequence[str], num_fewshot: Mapping[str, int] | None = None
) -> tuple[list[str], dict[str, int]]:
    """Replace the ``paper`` token by the paper's tasks, adding its few-shot counts under the user's."""
    out: list[str] = []
    shots: dict[str, int] = {}
    for name in names:
        if name == PAPER:
            out.extend(PAPER_TASKS)
            shots.update(PAPER_FEWSHOT)
        else:
            out.append(name)
    shots.update(num_fewshot or {})
    return list(dict.fromkeys(out)), shots


def _needs_embedded(names: Sequence[str]) -> bool:
    return any(n == EMBEDDED or n.startswith(f"{EMBEDDED}_") for n in names)


def _needs_defaults(names: Sequence[str], embedded: Sequence[EmbeddedTask]) -> bool:
    ours = {EMBEDDED, *(t.name for t in embedded)}
    return any(n not in ours for n in names)


@contextlib.contextmanager
def select_tasks(
    names: Sequence[str],
    eval_dir: str | Path | None,
    domains: Sequence[str] | None = None,
    key: str = "benchmark.tasks",
) -> Iterator[TaskSelection]:
    """Resolve ``names`` into a :class:`TaskSelection`; ``eval_dir`` is the include path of the embedded tasks.

    Raises a one-line PipelineError for an unknown name (with how to list valid ones) or for
    missing or malformed embedded data (naming the file). lm-eval's own task index is only built
    when a name outside the embedded tasks is requested (it takes seconds).
    """
    names = list(dict.fromkeys(names))
    if not names:
        raise PipelineError(f"{key}: no tasks given ({LIST_HINT})")
    embedded: list[EmbeddedTask] = []
    if _needs_embedded(names):
        if eval_dir is None:
            raise PipelineError(f"{key}: 'embedded' needs the corpus stage's eval data directory")
        embedded = embedded_tasks(eval_dir, domains)
    include = Path(eval_dir).resolve() if embedded and eval_dir is not None else None
    manager = _task_manager(include, _needs_defaults(names, embedded))
    known = set(manager.all_tasks)
    unknown = [n for n in names if n != EMBEDDED and n not in known]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, manager.all_tasks, n=3)
            hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise PipelineError(f"{key}: unknown lm-eval task {'; '.join(hints)}; {LIST_HINT}")
    report: list[str] = []
    for n in names:
        report.extend(t.name for t in embedded) if n == EMBEDDED else report.append(n)
    yield TaskSelection(
        requested=names,
        report_names=list(dict.fromkeys(report)),
        embedded=embedded,
        include_dir=include,
        manager=manager,
    )


def _task_manager(include: Path | None, defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    if include is None and not defaults:
        raise PipelineError("benchmark.tasks: nothing to evaluate")
    return TaskManager(include_path=str(include) if include else None, include_defaults=defaults)
