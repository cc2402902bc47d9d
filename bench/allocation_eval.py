"""Downstream comparison of global vs uniform budgets: lm-eval on checkpoints written by bench/allocation.py.

Each checkpoint is loaded with ``pipeline.models.loading.load_model`` (per-layer counts included)
and evaluated in memory through lm-eval's ``hf`` backend on the project's embedded tasks (every
held-out document); ``global - uniform`` per task with the benchmark's statistics (paired
bootstrap for perplexity, McNemar and a paired interval for accuracy; ``pipeline.evaluate.stats``).

The evidence is also written to ``--out`` (``allocation.json``, ``allocation.md`` and
``counts.png``: experts kept per layer, uniform against global, one panel per ``r``) and logged as
one MLflow run in the project's store (experiment of its params.yaml, run name
``allocation-evidence``, tagged with the model stage's run id): per ``r`` and task the two values,
their difference and its interval as metrics, the per-layer counts as params, the files as artifacts.

    .venv/bin/python bench/allocation_eval.py /tmp/budsnap /tmp/alloc --r 6 4 3 --out bench/results/cpu-2026-12-04/allocation
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from pipeline.config import load_params  # noqa: E402
from pipeline.evaluate import stats  # noqa: E402
from pipeline.evaluate.lmeval import ItemScores, evaluate_model  # noqa: E402
from pipeline.evaluate.tasks import select_tasks  # noqa: E402
from pipeline.io import atomic_dir, atomic_write_text, read_json, write_json  # noqa: E402
from pipeline.models.loading import load_model, load_tokenizer  # noqa: E402

from _evidence import cli, log_evidence_run  # noqa: E402  (bench/ is on sys.path as the script's folder)

ALLOCATIONS = ("uniform", "global")


def items(project: Path, checkpoint: Path, cache: Path) -> dict[str, ItemScores]:
    if cache.is_file():
        return {k: ItemScores.from_json(v) for k, v in json.loads(cache.read_text()).items()}
    model = load_model(checkpoint)
    with select_tasks(["embedded"], project / "outputs/corpus/eval") as selection:
        evaluation = evaluate_model(model, load_tokenizer(checkpoint), selection, batch_size=16)
    cache.write_text(json.dumps({k: v.to_json() for k, v in evaluation.items.items()}))
    return evaluation.items


def _interval(interval) -> list[float] | None:
    return None if interval is None else [float(interval[0]), float(interval[1])]


def compare_runs(r: int, base: dict[str, ItemScores], other: dict[str, ItemScores]) -> list[dict]:
    """One row per task and metric: uniform and global values with intervals, and ``global - uniform``."""
    rows = []
    for task in sorted(base):
        a, b = base[task], other[task]
        if a.doc_ids != b.doc_ids:
            raise SystemExit(f"{task}: the two checkpoints were scored on different documents")
        if a.loglikelihood is not None:
            metric = "bits_per_byte"
            counts = a.counts(metric) or []
            c = stats.compare_perplexity(metric, a.loglikelihood, b.loglikelihood, counts)
            rows.append({"r": r, "task": task, "metric": metric, "scale": 1.0,
                         "uniform": float(stats.corpus_metric(metric, np.asarray(a.loglikelihood), np.asarray(counts))),
                         "uniform_ci": _interval(stats.perplexity_interval(metric, a.loglikelihood, counts)),
                         "global": float(stats.corpus_metric(metric, np.asarray(b.loglikelihood), np.asarray(counts))),
                         "global_ci": _interval(stats.perplexity_interval(metric, b.loglikelihood, counts)),
                         "difference": c.difference, "difference_ci": _interval(c.interval), "verdict": c.verdict})
        if "acc" in a.scores:
            sa, sb = a.scores["acc"], b.scores["acc"]
            c = stats.compare_accuracy(sa, sb)
            rows.append({"r": r, "task": task, "metric": "acc", "scale": 100.0,
                         "uniform": sum(sa) / len(sa), "uniform_ci": _interval(stats.accuracy_interval(sa)),
                         "global": sum(sb) / len(sb), "global_ci": _interval(stats.accuracy_interval(sb)),
                         "difference": c.difference, "difference_ci": _interval(c.interval), "verdict": c.verdict})
    return rows


def _ci(iv: list[float] | None, scale: float, signed: bool = False) -> str:
    if iv is None:
        return "[-]"
    f = "+.3f" if signed else ".3f"
    return f"[{iv[0] * scale:{f}}, {iv[1] * scale:{f}}]"


def markdown(rows: list[dict]) -> str:
    """The downstream table of docs/benchmarks.md section 11."""
    lines = ["| r | task | metric | uniform [95% CI] | global [95% CI] | global - uniform [95% CI] |",
             "|---:|---|---|---|---|---|"]
    for x in rows:
        k = x["scale"]
        name = "acc (%)" if x["metric"] == "acc" else x["metric"]
        digits = ".1f" if x["metric"] == "acc" else ".4f"
        lines.append(f"| {x['r']} | {x['task']} | {name} | {x['uniform'] * k:{digits}} {_ci(x['uniform_ci'], k)} | "
                     f"{x['global'] * k:{digits}} {_ci(x['global_ci'], k)} | {x['difference'] * k:+.3f} "
                     f"{_ci(x['difference_ci'], k, signed=True)} ({x['verdict']}) |")
    return "\n".join(lines) + "\n"


def plot_counts(counts: dict[int, dict[str, list[int]]], num_experts: int, top_k: int, path: Path) -> Path:
    """``counts.png``: experts kept per MoE layer, uniform against global, one panel per ``r``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = sorted(counts, reverse=True)
    fig, axes = plt.subplots(1, len(rs), figsize=(3.6 * len(rs), 3.4), dpi=110, sharey=True, squeeze=False)
    for ax, r in zip(axes[0], rs, strict=True):
        layers = np.arange(len(counts[r]["uniform"]))
        for offset, name, color in ((-0.2, "uniform", "tab:gray"), (0.2, "global", "tab:blue")):
            ax.bar(layers + offset, counts[r][name], width=0.4, color=color, label=name)
        ax.axhline(top_k, color="tab:red", linestyle=":", linewidth=1, label=f"top_k = {top_k}")
        ax.set_xticks(layers, [str(i) for i in layers])
        ax.set_ylim(0, num_experts + 0.5)
        ax.set_xlabel("MoE layer")
        ax.set_title(f"r = {r}: {sum(counts[r]['global'])} experts in all")
    axes[0][0].set_ylabel(f"experts kept (of {num_experts})")
    axes[0][0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def log_evidence(project: Path, rs: list[int], counts: dict, losses: dict, rows: list[dict], files: list[Path]) -> str | None:
    """One MLflow run in the project's store with the evidence; returns its id (None when tracking is off)."""
    params = load_params(project / "params.yaml")
    metrics = {f"r{r}.{name}.relative_loss": losses[r][name] for r in rs for name in ALLOCATIONS}
    for x in rows:
        key = f"r{x['r']}.{x['task']}.{x['metric']}"
        metrics.update({f"{key}.uniform": x["uniform"], f"{key}.global": x["global"], f"{key}.difference": x["difference"]})
        if x["difference_ci"] is not None:
            metrics.update({f"{key}.difference_lo": x["difference_ci"][0], f"{key}.difference_hi": x["difference_ci"][1]})
    flat = {f"counts.r{r}.{name}": counts[r][name] for r in rs for name in ALLOCATIONS}
    return log_evidence_run(project, "allocation-evidence", params.tracking.experiment, "bench/allocation_eval.py",
                            params={"r": rs, **flat}, metrics=metrics, files=files, enabled=params.tracking.enabled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("exports", type=Path)
    parser.add_argument("--r", type=int, nargs="+", default=[6, 4, 3])
    parser.add_argument("--out", type=Path, default=None, help="write allocation.json/.md and counts.png here and log one MLflow run")
    args = parser.parse_args()
    rows: list[dict] = []
    counts: dict[int, dict[str, list[int]]] = {}
    losses: dict[int, dict[str, float]] = {}
    shape: tuple[int, int] = (0, 0)
    for r in args.r:
        runs = {}
        counts[r], losses[r] = {}, {}
        # sum_b ||Z_b||_F per layer: recorded by the global search only (the uniform one is the same search)
        norms = [layer["output_norm"] for layer in read_json(args.exports / f"r{r}_global" / "selection.json")["layers"]]
        for name in ALLOCATIONS:
            folder = args.exports / f"r{r}_{name}"
            selection = read_json(folder / "selection.json")
            shape = (selection["num_experts"], selection["top_k"])
            counts[r][name] = [len(layer["kept"]) for layer in selection["layers"]]
            losses[r][name] = float(sum(layer["loss"] / norm for layer, norm in zip(selection["layers"], norms, strict=True)))
            runs[name] = items(args.project, folder / "model", folder / "items.json")
        rows += compare_runs(r, runs["uniform"], runs["global"])
    table = markdown(rows)
    print(table, end="")
    if args.out is not None:
        with atomic_dir(args.out) as out:  # the folder appears only with its MLflow run
            files = [write_json(out / "allocation.json", {"counts": counts, "relative_loss": losses, "rows": rows}),
                     plot_counts(counts, *shape, out / "counts.png"), atomic_write_text(out / "allocation.md", table)]
            run_id = log_evidence(args.project.resolve(), args.r, counts, losses, rows, files)
        print(f"written to {args.out}; MLflow run {run_id}")


if __name__ == "__main__":
    cli(main)
