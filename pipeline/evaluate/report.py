"""The benchmark's outputs: the metrics file, the Markdown report (paper Table-1 layout) and plots."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.evaluate.lmeval import PERPLEXITY_METRICS, average_accuracy, primary_metric
from pipeline.io import atomic_write_text, write_json

#: Keys every variant entry of metrics.json carries (value None where not measured).
VARIANT_KEYS = (
    "tasks",
    "average_accuracy",
    "weight_bytes",
    "tokens_per_s",
    "speedup",
    "peak_rss_bytes",
    "peak_cuda_bytes",
    "expert_evals_per_token",
    "skipped_fraction",
    "experts_per_layer",
)
#: Columns of the perplexity table, in order of preference.
PPL_COLUMNS = ("bits_per_byte", "word_perplexity")


@dataclass
class VariantResult:
    """Everything measured for one variant."""

    name: str
    tasks: dict[str, dict[str, float]]
    weight_bytes: int
    experts_per_layer: int | None = None
    tokens_per_s: float | None = None
    peak_rss_bytes: int | None = None
    peak_cuda_bytes: int | None = None
    expert_evals_per_token: float | None = None
    skipped_fraction: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _clean(value: Any) -> Any:
    """JSON-safe numbers: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def build_metrics(results: Sequence[VariantResult], baseline: str = "original") -> dict[str, Any]:
    """The metrics.json document: ``{"variants": {name: {...}}}``; ``speedup`` is tokens/s over ``baseline``'s."""
    by_name = {r.name: r for r in results}
    base = by_name.get(baseline)
    base_speed = base.tokens_per_s if base is not None else None
    variants: dict[str, Any] = {}
    for r in results:
        speedup = None
        if r.tokens_per_s is not None and base_speed:
            speedup = r.tokens_per_s / base_speed
        variants[r.name] = _clean(
            {
                "tasks": r.tasks,
                "average_accuracy": average_accuracy(r.tasks),
                "weight_bytes": int(r.weight_bytes),
                "tokens_per_s": r.tokens_per_s,
                "speedup": speedup,
                "peak_rss_bytes": r.peak_rss_bytes,
                "peak_cuda_bytes": r.peak_cuda_bytes,
                "expert_evals_per_token": r.expert_evals_per_token,
                "skipped_fraction": r.skipped_fraction,
                "experts_per_layer": r.experts_per_layer,
            }
        )
    return {"variants": variants}


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


def flat_metrics(entry: Mapping[str, Any]) -> dict[str, Any]:
    """One variant's metrics as flat scalars (``<task>/<metric>`` for task metrics), e.g. for MLflow."""
    flat = {k: v for k, v in entry.items() if k != "tasks"}
    flat.update({f"{task}/{m}": v for task, ms in entry["tasks"].items() for m, v in ms.items()})
    return flat


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


def render_report(
    metrics: Mapping[str, Any], settings: Mapping[str, Any] | None = None, title: str = "Benchmark"
) -> str:
    """Markdown: the paper's Table-1 layout (variants as rows; tasks, average, memory, speed-up),
    then per-domain perplexity, speed and memory details, and the settings."""
    variants = metrics["variants"]
    acc_tasks = accuracy_tasks(metrics)
    ppl_tasks = perplexity_tasks(metrics)
    lines = [f"# {title}", ""]
    lines += [
        "Accuracy in % (lm-eval; the metric per task is named under the table); memory = weight bytes;",
        "speed-up = greedy decoding tokens/s at batch size 1 relative to `original`.",
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
            cells.append(_fmt(m.get(p) if p else None, ".2f", 100))
        cells += [
            _fmt(e["average_accuracy"], ".2f", 100),
            _fmt(e["weight_bytes"], ".1f", scale),
            _fmt(e["speedup"], ".2f", suffix="x"),
        ]
        rows.append(cells)
    lines += _table(header, rows)
    if acc_tasks:
        first = next(iter(variants.values()))["tasks"]
        named = [f"{t}: {primary_metric(t, first.get(t, {})) or '-'}" for t in acc_tasks]
        lines += ["", "Metrics: " + "; ".join(named) + "."]
    if ppl_tasks:
        lines += ["", "## Perplexity (rolling log-likelihood)", ""]
        header = ["Model"] + [f"{t} {c}" for t in ppl_tasks for c in PPL_COLUMNS]
        rows = [
            [name] + [_fmt(e["tasks"].get(t, {}).get(c), ".3f") for t in ppl_tasks for c in PPL_COLUMNS]
            for name, e in variants.items()
        ]
        lines += _table(header, rows)
    lines += ["", "## Speed and memory", ""]
    header = [
        "Model",
        "Tokens/s",
        "Speed-up",
        "Expert evals / token / layer",
        "Skipped",
        "Weights (MB)",
        "Peak RSS (MB)",
        "Peak CUDA (MB)",
    ]
    rows = [
        [
            name,
            _fmt(e["tokens_per_s"], ".1f"),
            _fmt(e["speedup"], ".3f", suffix="x"),
            _fmt(e["expert_evals_per_token"], ".3f"),
            _fmt(e["skipped_fraction"], ".1f", 100, "%"),
            _fmt(e["weight_bytes"], ".1f", 1e-6),
            _fmt(e["peak_rss_bytes"], ".0f", 1e-6),
            _fmt(e["peak_cuda_bytes"], ".0f", 1e-6),
        ]
        for name, e in variants.items()
    ]
    lines += _table(header, rows)
    if settings:
        lines += ["", "## Settings", ""]
        lines += [f"- `{k}`: {v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def _plot_rows(metrics: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    variants = metrics["variants"]
    memory = [
        {"variant": n, "weight_gb": e["weight_bytes"] / 1e9, "average_accuracy": e["average_accuracy"]}
        for n, e in variants.items()
        if e["average_accuracy"] is not None
    ]
    tasks = []
    for task in accuracy_tasks(metrics):
        for n, e in variants.items():
            m = e["tasks"].get(task, {})
            p = primary_metric(task, m)
            if p is not None:
                tasks.append({"label": f"{task} / {n}", "task": task, "variant": n, "metric": p, "accuracy": m[p]})
    speed = [
        {"variant": n, "speedup": e["speedup"], "tokens_per_s": e["tokens_per_s"]}
        for n, e in variants.items()
        if e["speedup"] is not None
    ]
    return {"accuracy_vs_memory": memory, "task_accuracy": tasks, "speedup": speed}


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
    ax.set_title("Average accuracy vs weight memory")
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
    for j, variant in enumerate(names):
        values = []
        for task in tasks:
            m = metrics["variants"][variant]["tasks"].get(task, {})
            p = primary_metric(task, m)
            values.append(m[p] * 100 if p else 0.0)
        ax.bar(
            [i + j * width for i in range(len(tasks))],
            values,
            width=width,
            label=variant,
            color=_variant_style(variant)["color"],
            hatch="//" if variant.endswith("_skip") else None,
            edgecolor="white" if not variant.endswith("_skip") else "black",
        )
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(tasks))], tasks, rotation=20, ha="right")
    ax.set_title("Accuracy per task and variant")
    ax.set_xlabel("task")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize="small")
    written.append(_save(fig, directory / "task_accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = data["speedup"]
    bars = ax.bar(
        [r["variant"] for r in rows],
        [r["speedup"] for r in rows],
        color=[_variant_style(r["variant"])["color"] for r in rows],
    )
    for bar, row in zip(bars, rows, strict=True):
        bar.set_hatch("//" if row["variant"].endswith("_skip") else "")
    ax.bar_label(bars, labels=[f"{r['speedup']:.2f}x\n{r['tokens_per_s']:.0f} tok/s" for r in rows], fontsize="small")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_ylim(0, max([r["speedup"] for r in rows] + [1.0]) * 1.25)
    ax.set_title("Decoding speed-up relative to the original model")
    ax.set_xlabel("variant (hatched: dynamic expert skipping)")
    ax.set_ylabel("speed-up (x, tokens/s over original)")
    written.append(_save(fig, directory / "speedup.png"))
    return written


def _variant_style(variant: str) -> dict[str, str]:
    """One colour per model (original, pruned, ...), shared by its ``_skip`` variant."""
    base = variant.removesuffix("_skip")
    palette = {"original": "tab:blue", "pruned": "tab:orange"}
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
