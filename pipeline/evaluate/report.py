"""The benchmark's outputs: the metrics file, the Markdown report (paper Table-1 layout) and plots.

Every accuracy, perplexity and speed-up carries its 95% interval and every variant its paired
difference from the baseline (``original``) with a verdict; how they are computed is
:mod:`pipeline.evaluate.stats`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.evaluate import stats
from pipeline.evaluate.lmeval import (
    ACCURACY_METRICS,
    PERPLEXITY_METRICS,
    ItemScores,
    average_accuracy,
    primary_metric,
)
from pipeline.io import atomic_write_text, write_json

#: Keys every variant entry of metrics.json carries (value None where not measured).
VARIANT_KEYS = (
    "tasks",
    "intervals",
    "average_accuracy",
    "average_accuracy_interval",
    "weight_bytes",
    "tokens_per_s",
    "tokens_per_s_spread",
    "speedup",
    "speedup_interval",
    "speedup_verdict",
    "skip_speedup",
    "vs_original",
    "peak_rss_bytes",
    "peak_cuda_bytes",
    "expert_evals_per_token",
    "skipped_fraction",
    "experts_per_layer",
)
#: Columns of the perplexity table, in order of preference.
PPL_COLUMNS = ("bits_per_byte", "word_perplexity")
#: The variant every other one is compared with.
BASELINE = "original"


@dataclass
class VariantResult:
    """Everything measured for one variant (``items``: per-document scores; ``tokens_per_s_runs``:
    tokens/s of every timed round, rounds aligned across variants)."""

    name: str
    tasks: dict[str, dict[str, float]]
    weight_bytes: int
    experts_per_layer: int | None = None
    tokens_per_s: float | None = None
    peak_rss_bytes: int | None = None
    peak_cuda_bytes: int | None = None
    expert_evals_per_token: float | None = None
    skipped_fraction: float | None = None
    items: dict[str, ItemScores] = field(default_factory=dict)
    tokens_per_s_runs: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _clean(value: Any) -> Any:
    """JSON-safe numbers: non-finite floats become None, tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def interval_json(interval: stats.Interval | None) -> dict[str, float] | None:
    """An interval as metrics.json holds it: ``{"low", "high"}`` (a mapping, so ``dvc metrics`` shows it)."""
    return {"low": interval[0], "high": interval[1]} if interval is not None else None


def _scores(r: VariantResult, task: str, metric: str) -> np.ndarray | None:
    """Per-document scores of ``task``'s ``metric`` when they reproduce lm-eval's value (else None:
    e.g. a group lm-eval averages over subtasks without weighting by size)."""
    items = r.items.get(task)
    values = items.scores.get(metric) if items is not None else None
    reported = r.tasks.get(task, {}).get(metric)
    if not values or reported is None:
        return None
    x = np.asarray(values, dtype=np.float64)
    return x if abs(float(x.mean()) - reported) <= 1e-6 else None


def _ppl_data(r: VariantResult, task: str, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    items = r.items.get(task)
    if items is None or items.loglikelihood is None or metric not in r.tasks.get(task, {}):
        return None
    counts = items.counts(metric)
    if counts is None:
        return None
    return np.asarray(items.loglikelihood, dtype=np.float64), np.asarray(counts, dtype=np.float64)


def _intervals(r: VariantResult) -> dict[str, dict[str, dict[str, float] | None]]:
    out: dict[str, dict[str, dict[str, float] | None]] = {}
    for task, metrics in r.tasks.items():
        found: dict[str, stats.Interval | None] = {}
        for metric in metrics:
            if metric in ACCURACY_METRICS and (x := _scores(r, task, metric)) is not None:
                found[metric] = stats.accuracy_interval(x)
            elif metric in PERPLEXITY_METRICS and (data := _ppl_data(r, task, metric)) is not None:
                found[metric] = stats.perplexity_interval(metric, *data)
        kept = {m: interval_json(ci) for m, ci in found.items() if ci is not None}
        if kept:
            out[task] = kept
    return out


def _accuracy_scores(r: VariantResult) -> dict[str, np.ndarray] | None:
    """Per-document primary-accuracy scores of every task counted in the average (None if any lacks them)."""
    out: dict[str, np.ndarray] = {}
    for task, metrics in r.tasks.items():
        metric = primary_metric(task, metrics)
        if metric is None:
            continue
        x = _scores(r, task, metric)
        if x is None:
            return None
        out[task] = x
    return out or None


def _pairing(base: ItemScores, other: ItemScores) -> tuple[list[int], list[int]]:
    """Indices of the documents both variants scored, in the baseline's order."""
    where = {d: i for i, d in enumerate(other.doc_ids)}
    common = [(i, where[d]) for i, d in enumerate(base.doc_ids) if d in where]
    return [i for i, _ in common], [j for _, j in common]


def _comparison_json(c: stats.Comparison) -> dict[str, Any]:
    return {
        "difference": c.difference,
        "interval": interval_json(c.interval),
        "p_value": c.p_value,
        "verdict": c.verdict,
        "n": c.n,
    }


def _vs_baseline(base: VariantResult, r: VariantResult) -> dict[str, Any]:
    """Paired differences ``r - base`` per task (primary accuracy; perplexity metrics) and of the average."""
    tasks: dict[str, dict[str, Any]] = {}
    average_pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for task, metrics in r.tasks.items():
        if task not in base.items or task not in r.items:
            continue
        bi, oi = _pairing(base.items[task], r.items[task])
        if not bi:
            continue
        found: dict[str, Any] = {}
        metric = primary_metric(task, metrics)
        if metric is not None:
            a, b = _scores(base, task, metric), _scores(r, task, metric)
            if a is not None and b is not None:
                found[metric] = _comparison_json(stats.compare_accuracy(a[bi], b[oi]))
                average_pairs.append((a[bi], b[oi]))
        for metric in PERPLEXITY_METRICS:
            a_data, b_data = _ppl_data(base, task, metric), _ppl_data(r, task, metric)
            if a_data is not None and b_data is not None:
                found[metric] = _comparison_json(
                    stats.compare_perplexity(metric, a_data[0][bi], b_data[0][oi], a_data[1][bi])
                )
        if found:
            tasks[task] = found
    counted = [t for t, m in r.tasks.items() if primary_metric(t, m) is not None]
    average = None
    if counted and len(average_pairs) == len(counted):
        average = _comparison_json(stats.compare_average_accuracy(average_pairs))
    return {"tasks": tasks, "average_accuracy": average}


def _runs(r: VariantResult) -> list[float]:
    if r.tokens_per_s_runs:
        return [float(x) for x in r.tokens_per_s_runs]
    return [float(r.tokens_per_s)] if r.tokens_per_s is not None else []


def _speed(base: VariantResult | None, r: VariantResult) -> dict[str, Any]:
    spread = stats.spread(_runs(r))
    out: dict[str, Any] = {
        "tokens_per_s_spread": vars(spread) if spread is not None else None,
        "speedup": None,
        "speedup_interval": None,
        "speedup_verdict": None,
    }
    if base is None:
        return out
    if base is r:
        out["speedup"] = 1.0 if spread is not None else None
        return out
    base_runs, runs = _runs(base), _runs(r)
    if base_runs and len(base_runs) == len(runs):
        s = stats.speedup(base_runs, runs)
        if s is not None:
            out.update(speedup=s.ratio, speedup_interval=interval_json(s.interval), speedup_verdict=s.verdict)
    return out


#: Suffix of a dynamic-skipping variant; the same name without it is the variant it skips from.
SKIP_SUFFIX = "_skip"


def _skip_speedup(by_name: Mapping[str, VariantResult], r: VariantResult) -> dict[str, Any] | None:
    """A ``*_skip`` variant's tokens/s over its no-skip counterpart's (same rounds), with interval and verdict."""
    if not r.name.endswith(SKIP_SUFFIX):
        return None
    plain = by_name.get(r.name[: -len(SKIP_SUFFIX)])
    if plain is None:
        return None
    base_runs, runs = _runs(plain), _runs(r)
    if not base_runs or len(base_runs) != len(runs):
        return None
    s = stats.speedup(base_runs, runs)
    if s is None:
        return None
    return {"over": plain.name, "ratio": s.ratio, "interval": interval_json(s.interval), "verdict": s.verdict}


def build_metrics(results: Sequence[VariantResult], baseline: str = BASELINE) -> dict[str, Any]:
    """The metrics.json document: ``{"baseline", "statistics", "variants": {name: {...}}}``.

    Per variant: lm-eval's metrics, their 95% intervals, the average accuracy and its interval,
    tokens/s (median) with its spread over rounds, the speed-up over ``baseline`` (median of the
    per-round ratios) with its interval and verdict, and ``vs_original``: the paired differences
    from ``baseline`` with intervals, McNemar p-values (accuracy) and verdicts (None for the
    baseline itself, or without it).
    """
    by_name = {r.name: r for r in results}
    base = by_name.get(baseline)
    variants: dict[str, Any] = {}
    for r in results:
        acc = _accuracy_scores(r)
        variants[r.name] = _clean(
            {
                "tasks": r.tasks,
                "intervals": _intervals(r),
                "average_accuracy": average_accuracy(r.tasks),
                "average_accuracy_interval": interval_json(stats.mean_of_means_interval(list(acc.values())))
                if acc
                else None,
                "weight_bytes": int(r.weight_bytes),
                "tokens_per_s": r.tokens_per_s,
                **_speed(base, r),
                "skip_speedup": _skip_speedup(by_name, r),
                "vs_original": _vs_baseline(base, r) if base is not None and base is not r else None,
                "peak_rss_bytes": r.peak_rss_bytes,
                "peak_cuda_bytes": r.peak_cuda_bytes,
                "expert_evals_per_token": r.expert_evals_per_token,
                "skipped_fraction": r.skipped_fraction,
                "experts_per_layer": r.experts_per_layer,
            }
        )
    return {"baseline": baseline, "statistics": dict(stats.METHOD), "variants": variants}


def _check_interval(where: str, value: Any) -> None:
    if value is None:
        return
    bounds = [value.get("low"), value.get("high")] if isinstance(value, Mapping) and len(value) == 2 else []
    ok = len(bounds) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bounds)
    if not ok or bounds[0] > bounds[1]:
        raise PipelineError(f"benchmark metrics: {where}: an interval must be {{low, high}} with low <= high")


def check_metrics(doc: Mapping[str, Any]) -> None:
    """Raise a one-line PipelineError when ``doc`` does not follow the metrics.json schema."""
    variants = doc.get("variants") if isinstance(doc, Mapping) else None
    if not isinstance(variants, Mapping) or not variants:
        raise PipelineError("benchmark metrics: 'variants' must be a non-empty mapping")
    for name, entry in variants.items():
        missing = [k for k in VARIANT_KEYS if k not in entry]
        if missing:
            raise PipelineError(f"benchmark metrics: variant {name!r} lacks {', '.join(missing)}")
        if not isinstance(entry["tasks"], Mapping):
            raise PipelineError(f"benchmark metrics: variant {name!r}: 'tasks' must map task -> metrics")
        for task, metrics in entry["tasks"].items():
            bad = [m for m, v in metrics.items() if isinstance(v, bool) or not isinstance(v, int | float)]
            if bad:
                raise PipelineError(f"benchmark metrics: {name}/{task}: non-numeric metric(s) {', '.join(bad)}")
        for task, metrics in (entry["intervals"] or {}).items():
            for metric, interval in metrics.items():
                _check_interval(f"{name}/{task}/{metric}", interval)
        _check_interval(f"{name}/average_accuracy_interval", entry["average_accuracy_interval"])
        _check_interval(f"{name}/speedup_interval", entry["speedup_interval"])
        verdicts = (None, stats.FASTER, stats.SLOWER, stats.WITHIN_NOISE)
        skip = entry["skip_speedup"]
        if skip is not None:
            _check_interval(f"{name}/skip_speedup/interval", skip.get("interval"))
            if skip.get("verdict") not in verdicts:
                raise PipelineError(f"benchmark metrics: {name}: skip_speedup verdict {skip.get('verdict')!r} is not one of {sorted(v for v in verdicts if v)}")
        if entry["speedup_verdict"] not in verdicts:
            raise PipelineError(f"benchmark metrics: {name}: speedup_verdict {entry['speedup_verdict']!r} is not one of "
                                f"{', '.join(map(str, verdicts[1:]))}")
        for where, c in _comparisons(entry):
            if c.get("verdict") not in (stats.BETTER, stats.WORSE, stats.WITHIN_NOISE):
                raise PipelineError(f"benchmark metrics: {name}/vs_original/{where}: verdict {c.get('verdict')!r}")
            _check_interval(f"{name}/vs_original/{where}", c.get("interval"))


def _comparisons(entry: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``(<task>/<metric> or average_accuracy, comparison)`` of a variant's ``vs_original``."""
    vs = entry.get("vs_original") or {}
    out = [(f"{task}/{metric}", c) for task, ms in (vs.get("tasks") or {}).items() for metric, c in ms.items()]
    if vs.get("average_accuracy"):
        out.append(("average_accuracy", vs["average_accuracy"]))
    return out


def flat_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """One variant's numeric results as flat scalars, e.g. for MLflow: ``<task>/<metric>``,
    ``<task>/<metric>_ci_low|_ci_high``, ``average_accuracy_ci_low``, ``speedup_ci_low``,
    ``skip_speedup`` (a skip variant over its no-skip one) with its ``_ci_low|_ci_high``,
    ``tokens_per_s_min|max|q1|q3`` and ``vs_original/<task>/<metric>/difference|ci_low|ci_high|p_value``."""
    flat: dict[str, Any] = {k: v for k, v in entry.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    flat.update({f"{task}/{m}": v for task, ms in entry["tasks"].items() for m, v in ms.items()})

    def bounds(prefix: str, interval: Mapping[str, float] | None) -> None:
        if interval is not None:
            flat[f"{prefix}_ci_low"], flat[f"{prefix}_ci_high"] = interval["low"], interval["high"]

    for task, ms in (entry.get("intervals") or {}).items():
        for m, interval in ms.items():
            bounds(f"{task}/{m}", interval)
    bounds("average_accuracy", entry.get("average_accuracy_interval"))
    bounds("speedup", entry.get("speedup_interval"))
    skip = entry.get("skip_speedup")
    if skip:
        flat["skip_speedup"] = skip["ratio"]
        bounds("skip_speedup", skip["interval"])
    for key, value in (entry.get("tokens_per_s_spread") or {}).items():
        if key in ("min", "max", "q1", "q3"):
            flat[f"tokens_per_s_{key}"] = value
    for where, c in _comparisons(entry):
        flat[f"vs_original/{where}/difference"] = c["difference"]
        if c.get("interval") is not None:
            flat[f"vs_original/{where}/ci_low"] = c["interval"]["low"]
            flat[f"vs_original/{where}/ci_high"] = c["interval"]["high"]
        if c.get("p_value") is not None:
            flat[f"vs_original/{where}/p_value"] = c["p_value"]
    return {k: v for k, v in flat.items() if v is not None}


def verdict_tags(entry: Mapping[str, Any]) -> dict[str, str]:
    """One variant's verdicts as MLflow tags: ``verdict/speedup`` and ``verdict/<task>/<metric>``."""
    tags = {f"verdict/{where}": c["verdict"] for where, c in _comparisons(entry)}
    if entry.get("speedup_verdict"):
        tags["verdict/speedup"] = entry["speedup_verdict"]
    if entry.get("skip_speedup"):
        tags["verdict/skip_speedup"] = entry["skip_speedup"]["verdict"]
    return tags


def _fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{int(value):d}{suffix}" if spec == "d" else f"{value * scale:{spec}}{suffix}"


def accuracy_tasks(metrics: Mapping[str, Any]) -> list[str]:
    """Tasks with an accuracy metric, in first-seen order over the variants."""
    seen: dict[str, None] = {}
    for entry in metrics["variants"].values():
        for task, m in entry["tasks"].items():
            if primary_metric(task, m) is not None:
                seen.setdefault(task, None)
    return list(seen)


def perplexity_tasks(metrics: Mapping[str, Any]) -> list[str]:
    """Tasks with a perplexity metric, in first-seen order."""
    seen: dict[str, None] = {}
    for entry in metrics["variants"].values():
        for task, m in entry["tasks"].items():
            if any(k in m for k in PERPLEXITY_METRICS):
                seen.setdefault(task, None)
    return list(seen)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _ci(interval: Mapping[str, float] | None, spec: str, scale: float = 1.0) -> str:
    if interval is None:
        return "[-]"
    return f"[{interval['low'] * scale:{spec}}, {interval['high'] * scale:{spec}}]"


def _with_ci(value: float | None, interval: Mapping[str, float] | None, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return f"{value * scale:{spec}} {_ci(interval, spec, scale)}"


def speedup_cell(entry: Mapping[str, Any], reference: bool = False) -> str:
    """The speed-up as the report prints it: a within-noise ratio never reads as a speed-up."""
    ratio, interval, word = entry["speedup"], entry["speedup_interval"], entry["speedup_verdict"]
    if ratio is None:
        return "-"
    if reference:
        return f"{ratio:.2f}x (reference)"
    text = f"{ratio:.2f}x {_ci(interval, '.2f')}" if interval is not None else f"{ratio:.2f}x, no interval"
    if word == stats.FASTER:
        return text
    if word in (None, stats.WITHIN_NOISE) and interval is not None and not interval["low"] <= 1.0 <= interval["high"]:
        text += ", too few rounds"
    return f"{word or stats.WITHIN_NOISE} ({text})"


def skip_speedup_cell(entry: Mapping[str, Any]) -> str:
    """A skip variant's tokens/s over its no-skip counterpart's, worded like :func:`speedup_cell`."""
    skip = entry.get("skip_speedup")
    if not skip:
        return "-"
    return speedup_cell({"speedup": skip["ratio"], "speedup_interval": skip["interval"], "speedup_verdict": skip["verdict"]})


def _difference_rows(name: str, entry: Mapping[str, Any], acc_tasks: Sequence[str]) -> list[list[str]]:
    rows: list[list[str]] = []
    for where, c in _comparisons(entry):
        task, _, metric = where.partition("/")
        is_acc = metric in ACCURACY_METRICS or where == "average_accuracy"
        if not is_acc and metric not in PPL_COLUMNS:
            continue
        scale, spec, unit = (100.0, "+.1f", " pp") if is_acc else (1.0, "+.3f", "")
        label = ("Average", "accuracy") if where == "average_accuracy" else (task, metric)
        rows.append(
            [
                name,
                *label,
                f"{c['difference'] * scale:{spec}}{unit}",
                _ci(c.get("interval"), spec, scale),
                f"{c['p_value']:.3g}" if c.get("p_value") is not None else "-",
                c["verdict"],
            ]
        )
    order = {t: i for i, t in enumerate([*acc_tasks, "Average"])}
    rows.sort(key=lambda row: order.get(row[1], len(order)))
    if entry.get("speedup") is not None and entry.get("vs_original") is not None:
        rows.append(
            [name, "decoding", "speed-up", f"{entry['speedup']:.2f}x", _ci(entry["speedup_interval"], ".2f"), "-",
             entry["speedup_verdict"] or stats.WITHIN_NOISE]
        )
    return rows


def render_report(
    metrics: Mapping[str, Any], settings: Mapping[str, Any] | None = None, title: str = "Benchmark"
) -> str:
    """Markdown: the paper's Table-1 layout (variants as rows; tasks, average, memory, speed-up)
    with 95% intervals, the paired differences from the baseline with verdicts, per-domain
    perplexity, speed and memory details, how the intervals are computed, and the settings."""
    variants = metrics["variants"]
    baseline = metrics.get("baseline", BASELINE)
    acc_tasks = accuracy_tasks(metrics)
    ppl_tasks = perplexity_tasks(metrics)
    lines = [f"# {title}", ""]
    lines += [
        "Accuracy in % with its 95% interval in brackets (lm-eval; the metric per task is named under the table);",
        f"memory = weight bytes; speed-up = greedy decoding tokens/s at batch size 1 relative to `{baseline}`,",
        "printed as a speed-up only when its 95% interval excludes 1.",
        "",
    ]
    largest = max((e["weight_bytes"] or 0 for e in variants.values()), default=0)
    unit, scale = ("GB", 1e-9) if largest >= 1e9 else ("MB", 1e-6)
    header = ["Model", "Experts", *acc_tasks, "Average", f"Memory ({unit})", "Speed-up"]
    rows = []
    for name, e in variants.items():
        cells = [name, _fmt(e.get("experts_per_layer"), "d")]
        for task in acc_tasks:
            m = e["tasks"].get(task, {})
            p = primary_metric(task, m)
            cells.append(_with_ci(m.get(p) if p else None, (e["intervals"].get(task) or {}).get(p), ".1f", 100))
        cells += [
            _with_ci(e["average_accuracy"], e["average_accuracy_interval"], ".1f", 100),
            _fmt(e["weight_bytes"], ".1f", scale),
            speedup_cell(e, reference=name == baseline),
        ]
        rows.append(cells)
    lines += _table(header, rows)
    if acc_tasks:
        first = next(iter(variants.values()))["tasks"]
        named = [f"{t}: {primary_metric(t, first.get(t, {})) or '-'}" for t in acc_tasks]
        lines += ["", "Metrics: " + "; ".join(named) + "."]
    diff_rows = [row for name, e in variants.items() for row in _difference_rows(name, e, acc_tasks)]
    if diff_rows:
        lines += ["", f"## Differences from `{baseline}`", ""]
        lines += [
            f"Variant minus `{baseline}` on the same items (accuracy in percentage points; perplexity metrics in",
            "their units, lower is better). Verdict: better / worse when the 95% interval of the difference",
            "excludes 0, else within noise; for the speed-up, faster / slower when its interval excludes 1.",
            "",
        ]
        lines += _table(["Model", "Task", "Metric", "Difference", "95% interval", "McNemar p", "Verdict"], diff_rows)
    if ppl_tasks:
        lines += ["", "## Perplexity (rolling log-likelihood)", ""]
        header = ["Model"] + [f"{t} {c}" for t in ppl_tasks for c in PPL_COLUMNS]
        rows = [
            [name]
            + [
                _with_ci(e["tasks"].get(t, {}).get(c), (e["intervals"].get(t) or {}).get(c), ".3f")
                for t in ppl_tasks
                for c in PPL_COLUMNS
            ]
            for name, e in variants.items()
        ]
        lines += _table(header, rows)
    lines += ["", "## Speed and memory", ""]
    header = [
        "Model",
        "Tokens/s (median)",
        "Min-max",
        "IQR",
        "Rounds",
        "Speed-up [95%]",
        "Skip vs no-skip [95%]",
        "Expert evals / token / layer",
        "Skipped",
        "Weights (MB)",
        "Peak RSS (MB)",
        "Peak CUDA (MB)",
    ]
    rows = []
    for name, e in variants.items():
        sp = e["tokens_per_s_spread"] or {}
        rows.append(
            [
                name,
                _fmt(e["tokens_per_s"], ".1f"),
                f"{sp['min']:.1f}-{sp['max']:.1f}" if sp else "-",
                f"{sp['q1']:.1f}-{sp['q3']:.1f}" if sp else "-",
                _fmt(sp.get("rounds"), "d"),
                speedup_cell(e, reference=name == baseline),
                skip_speedup_cell(e),
                _fmt(e["expert_evals_per_token"], ".3f"),
                _fmt(e["skipped_fraction"], ".1f", 100, "%"),
                _fmt(e["weight_bytes"], ".1f", 1e-6),
                _fmt(e["peak_rss_bytes"], ".0f", 1e-6),
                _fmt(e["peak_cuda_bytes"], ".0f", 1e-6),
            ]
        )
    lines += _table(header, rows)
    lines += ["", "## How the intervals are computed", "", method_text(metrics.get("statistics") or stats.METHOD)]
    if settings:
        lines += ["", "## Settings", ""]
        lines += [f"- `{k}`: {v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def method_text(method: Mapping[str, Any]) -> str:
    """One paragraph on how the report's intervals, tests and verdicts are computed."""
    return (
        f"All intervals are {method['confidence']:.0%}. Accuracy: {method['accuracy_interval']}. "
        f"Perplexity and bits per byte: {method['perplexity_interval']}. Differences from the baseline: "
        f"{method['difference_interval']}; for accuracy also {method['accuracy_test']}. Average accuracy: "
        f"{method['average_accuracy_interval']}. Tokens/s: median, min-max and interquartile range over the "
        f"interleaved rounds; speed-up: {method['speedup_interval']}, with a verdict only from "
        f"{method['speedup_min_rounds']} rounds on (fewer cannot reach {method['confidence']:.0%}). Bootstraps: "
        f"{method['bootstrap_resamples']} resamples, seed {method['seed']} (scipy.stats.bootstrap). "
        "An interval shown as [-] could not be estimated (fewer than two items, documents or rounds)."
    )


def _bounds(interval: Mapping[str, float] | None) -> dict[str, float | None]:
    return {"ci_low": interval["low"] if interval else None, "ci_high": interval["high"] if interval else None}


def _plot_rows(metrics: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    variants = metrics["variants"]
    memory = [
        {
            "variant": n,
            "weight_gb": e["weight_bytes"] / 1e9,
            "average_accuracy": e["average_accuracy"],
            **_bounds(e["average_accuracy_interval"]),
        }
        for n, e in variants.items()
        if e["average_accuracy"] is not None
    ]
    tasks = []
    for task in accuracy_tasks(metrics):
        for n, e in variants.items():
            m = e["tasks"].get(task, {})
            p = primary_metric(task, m)
            if p is not None:
                tasks.append(
                    {
                        "label": f"{task} / {n}",
                        "task": task,
                        "variant": n,
                        "metric": p,
                        "accuracy": m[p],
                        **_bounds((e["intervals"].get(task) or {}).get(p)),
                    }
                )
    speed = [
        {
            "variant": n,
            "speedup": e["speedup"],
            "tokens_per_s": e["tokens_per_s"],
            "verdict": e["speedup_verdict"],
            **_bounds(e["speedup_interval"]),
        }
        for n, e in variants.items()
        if e["speedup"] is not None
    ]
    return {"accuracy_vs_memory": memory, "task_accuracy": tasks, "speedup": speed}


def _yerr(rows: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0) -> np.ndarray:
    """Asymmetric error bars (2 x n) from the rows' intervals; zero where a row has none."""
    low = [(r[key] - r["ci_low"]) * scale if r.get("ci_low") is not None else 0.0 for r in rows]
    high = [(r["ci_high"] - r[key]) * scale if r.get("ci_high") is not None else 0.0 for r in rows]
    return np.maximum(np.array([low, high], dtype=np.float64).reshape(2, len(rows)), 0.0)


def write_plots(metrics: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """PNG figures plus the JSON data ``dvc plots`` renders: accuracy vs weight memory,
    per-task accuracy per variant, speed-up per variant. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = _plot_rows(metrics)
    written: list[Path] = []
    for name, rows in data.items():
        written.append(write_json(directory / f"{name}.json", rows))

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = data["accuracy_vs_memory"]
    scale, unit = (1.0, "GB") if max((r["weight_gb"] for r in rows), default=0) >= 1 else (1e3, "MB")
    for row in rows:
        skip = row["variant"].endswith("_skip")
        style = _variant_style(row["variant"])
        ax.errorbar(
            row["weight_gb"] * scale,
            row["average_accuracy"] * 100,
            yerr=_yerr([row], "average_accuracy", 100),
            fmt="none",
            ecolor=style["color"],
            capsize=3,
            zorder=2,
        )
        ax.scatter(
            row["weight_gb"] * scale,
            row["average_accuracy"] * 100,
            s=40 if skip else 110,
            marker="^" if skip else "o",
            facecolors=style["color"] if skip else "none",
            edgecolors=style["color"],
            linewidths=1.6,
            label=row["variant"],
            zorder=3,
        )
    ax.set_title("Average accuracy vs weight memory (bars: 95% interval)")
    ax.set_xlabel(f"weight memory ({unit})")
    ax.set_ylabel("average accuracy (%)")
    ax.grid(alpha=0.3)
    if rows:  # coinciding points stay apart in the legend: circle = all experts run, triangle = skipping
        ax.legend(title="variant", fontsize="small", loc="best")
    written.append(_save(fig, directory / "accuracy_vs_memory.png"))

    tasks = accuracy_tasks(metrics)
    names = list(metrics["variants"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * max(1, len(names)) / 2), 4))
    width = 0.8 / max(1, len(names))
    by_key = {(r["task"], r["variant"]): r for r in data["task_accuracy"]}
    for j, variant in enumerate(names):
        bars = [by_key.get((task, variant), {"accuracy": 0.0, "ci_low": None, "ci_high": None}) for task in tasks]
        ax.bar(
            [i + j * width for i in range(len(tasks))],
            [b["accuracy"] * 100 for b in bars],
            yerr=_yerr(bars, "accuracy", 100),
            capsize=2,
            error_kw={"elinewidth": 0.8},
            width=width,
            label=variant,
            color=_variant_style(variant)["color"],
            hatch="//" if variant.endswith("_skip") else None,
            edgecolor="white" if not variant.endswith("_skip") else "black",
        )
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(tasks))], tasks, rotation=20, ha="right")
    ax.set_title("Accuracy per task and variant (bars: 95% interval)")
    ax.set_xlabel("task")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize="small")
    written.append(_save(fig, directory / "task_accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = data["speedup"]
    bars = ax.bar(
        [r["variant"] for r in rows],
        [r["speedup"] for r in rows],
        yerr=_yerr(rows, "speedup") if rows else None,
        capsize=4,
        color=[_variant_style(r["variant"])["color"] for r in rows],
    )
    for bar, row in zip(bars, rows, strict=True):
        bar.set_hatch("//" if row["variant"].endswith("_skip") else "")

    def label(row: Mapping[str, Any]) -> str:
        noise = "\nwithin noise" if row["verdict"] == stats.WITHIN_NOISE else ""
        return f"{row['speedup']:.2f}x{noise}\n{row['tokens_per_s']:.0f} tok/s"

    ax.bar_label(bars, labels=[label(r) for r in rows], fontsize="small", padding=3)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    tops = [r["ci_high"] if r["ci_high"] is not None else r["speedup"] for r in rows]
    ax.set_ylim(0, max(tops + [1.0]) * 1.35)
    ax.set_title("Decoding speed-up vs the original model (bars: 95% interval)")
    ax.set_xlabel("variant (hatched: dynamic expert skipping)")
    ax.set_ylabel("speed-up (x, tokens/s over original)")
    written.append(_save(fig, directory / "speedup.png"))
    return written


def _variant_style(variant: str) -> dict[str, str]:
    """One colour per model (original, pruned, ...), shared by its ``_skip`` variant."""
    base = variant.removesuffix("_skip")
    palette = {"original": "tab:blue", "pruned": "tab:orange", "merged": "tab:green", "pruned_top1": "tab:red"}
    return {"color": palette.get(base, "tab:green")}


def _save(fig: Any, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    from pipeline.io import atomic_write_bytes

    return atomic_write_bytes(path, buf.getvalue())


def write_report(metrics: Mapping[str, Any], path: str | Path, settings: Mapping[str, Any] | None = None) -> Path:
    """Render :func:`render_report` into ``path`` atomically."""
    return atomic_write_text(path, render_report(metrics, settings))
