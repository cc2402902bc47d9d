"""The comparison grid: strategies x kept experts x calibration sets, each run of the pipeline scored by
its search loss and downstream quality, and the summary that answers which choice is better.

This module knows nothing of DVC: ``scripts/compare.py`` runs every grid point as a DVC experiment and
hands this module what each run wrote (its search and benchmark metrics, its per-document scores).
The grid is declared in ``compare.yaml``; its strategy names come from the search registry and its
calibration names from ``params.yaml``.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.config import flatten, validate
from pipeline.errors import PipelineError
from pipeline.evaluate.lmeval import ItemScores
from pipeline.evaluate.report import BASELINE, VariantResult, build_metrics, perplexity_tasks
from pipeline.search.registry import STRATEGIES
from pipeline.task_files import task_domain

#: The benchmark variant every grid run evaluates (the pruned export).
PRUNED = "pruned"
#: The keys of ``compare.yaml``.
GRID_KEYS = ("strategies", "r", "calibration", "overrides")


@dataclass(frozen=True)
class GridPoint:
    """One run of the grid: a search strategy, the experts kept per layer, the calibration set."""

    strategy: str
    r: int
    calibration: str

    @property
    def name(self) -> str:
        """Its DVC experiment name (also the MLflow ``dvc_exp`` tag and the summary's row label)."""
        return f"cmp-{self.strategy}-r{self.r}-{self.calibration}"

    def settings(self) -> dict[str, Any]:
        """The params it sets, as dotted keys."""
        return {"search.strategy": self.strategy, "search.r": self.r, "search.calibration": self.calibration}


@dataclass(frozen=True)
class Grid:
    """Every grid point, in run order, and the params overrides shared by all of them."""

    points: tuple[GridPoint, ...]
    overrides: Mapping[str, Any]
    #: The strategy every other one is compared with downstream: the first of the file's ``strategies``.
    best: str = "enumerate"

    def set_args(self, point: GridPoint) -> list[str]:
        """``dvc exp run`` arguments (``-S key=value`` pairs, values in YAML flow style) for ``point``."""
        args: list[str] = []
        for key, value in {**self.overrides, **point.settings()}.items():
            text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
            args += ["-S", f"{key}={text}"]
        return args


def _set_dotted(doc: dict[str, Any], key: str, value: Any) -> None:
    node = doc
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise PipelineError(f"compare.yaml: overrides: {key}: no params section {part!r} in params.yaml")
        node = node[part]
    if leaf not in node:
        raise PipelineError(f"compare.yaml: overrides: {key}: not a key of params.yaml")
    node[leaf] = copy.deepcopy(value)


def load_grid(path: str | Path, params: Mapping[str, Any]) -> Grid:
    """The grid declared in ``path`` (``compare.yaml``), checked against ``params`` (params.yaml as loaded):
    known strategies, calibration sets that exist, and every point's params valid for the model."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: no grid file (see docs/compare.md)") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise PipelineError(f"{path}: expected a mapping with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(doc) - set(GRID_KEYS))
    if unknown:
        raise PipelineError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(GRID_KEYS)})")

    def listed(key: str, kind: type) -> list[Any]:
        values = doc.get(key)
        if not isinstance(values, list) or not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
            raise PipelineError(f"{path}: {key}: expected a non-empty list of {kind.__name__}")
        if len(set(values)) != len(values):
            raise PipelineError(f"{path}: {key}: repeated value")
        return values

    strategies, rs, calibrations = listed("strategies", str), listed("r", int), listed("calibration", str)
    for s in strategies:
        if s not in STRATEGIES:
            raise PipelineError(f"{path}: strategies: unknown strategy {s!r} (known: {', '.join(STRATEGIES)})")
    sets = (params.get("calibration") or {}).get("sets") or {}
    for c in calibrations:
        if c not in sets:
            raise PipelineError(f"{path}: calibration: no set {c!r} in params.yaml calibration.sets ({', '.join(sets)})")
    overrides = doc.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise PipelineError(f"{path}: overrides: expected a mapping of dotted params keys to values")
    # r first (in the file's order), then set, then strategy: a grid cut short has every strategy and set at its first r
    points = tuple(GridPoint(s, r, c) for r, c, s in itertools.product(rs, calibrations, strategies))
    for point in points:
        trial = copy.deepcopy(dict(params))
        for key, value in {**overrides, **point.settings()}.items():
            _set_dotted(trial, key, value)
        try:
            validate(trial, origin=f"{path} ({point.name})")
        except PipelineError as exc:
            raise PipelineError(str(exc)) from None
    return Grid(points=points, overrides=dict(overrides), best=strategies[0])


# --------------------------------------------------------------------------- what one run wrote


def variant_result(name: str, metrics: Mapping[str, Any], items: Mapping[str, Any]) -> VariantResult:
    """A benchmark variant rebuilt from its ``metrics.json`` entry and its ``<variant>.items.json``."""
    entry = metrics["variants"][name]
    return VariantResult(
        name=name,
        tasks={t: dict(m) for t, m in entry["tasks"].items()},
        weight_bytes=int(entry.get("weight_bytes") or 0),
        items={t: ItemScores.from_json(doc) for t, doc in items["tasks"].items()},
    )


def run_record(point: GridPoint, search: Mapping[str, Any], benchmark: Mapping[str, Any],
               items: Mapping[str, Any], run_ids: Mapping[str, str | None]) -> dict[str, Any]:
    """What the summary keeps of one grid run: its settings, search losses (total and per layer,
    the baselines' too), the pruned model's benchmark entry and per-document scores, MLflow run ids."""
    if PRUNED not in benchmark.get("variants", {}):
        raise PipelineError(f"{point.name}: the benchmark has no {PRUNED!r} variant (compare.yaml overrides: benchmark.variants)")
    return {
        "name": point.name,
        "strategy": point.strategy,
        "r": point.r,
        "calibration": point.calibration,
        "search_loss": float(search["loss"]),
        "layer_loss": {k: float(v["loss"]) for k, v in search["layers"].items()},
        "baseline_loss": {k: float(v) for k, v in (search.get("baselines") or {}).items()},
        "search_seconds": search.get("seconds"),
        "candidates_evaluated": search.get("candidates_evaluated"),
        "benchmark": {BASELINE: None, "variants": {PRUNED: benchmark["variants"][PRUNED]}},
        "items": items,
        "mlflow_runs": dict(run_ids),
    }


# --------------------------------------------------------------------------- the summary


def _paired(base: VariantResult, other: VariantResult) -> dict[str, Any]:
    """``other - base`` per task and for the average accuracy (pipeline.evaluate's paired statistics)."""
    renamed = VariantResult(**{**vars(other), "name": "other"})
    doc = build_metrics([VariantResult(**{**vars(base), "name": BASELINE}), renamed])
    return doc["variants"]["other"]["vs_original"]


def _result(run: Mapping[str, Any]) -> VariantResult:
    return variant_result(PRUNED, run["benchmark"], run["items"])


def _spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, float | int | None]:
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:   # no ranking to correlate
        return {"rho": None, "p_value": None, "n": len(x)}
    res = spearmanr(x, y)
    rho, p = float(res.statistic), float(res.pvalue)
    return {"rho": rho if math.isfinite(rho) else None, "p_value": p if math.isfinite(p) else None, "n": len(x)}


def summarise(original: VariantResult, runs: Sequence[Mapping[str, Any]], reference: Mapping[str, Any] | None = None,
              best: str = "enumerate") -> dict[str, Any]:
    """The grid's summary: one row per run (search loss; per-domain bits per byte and the average
    accuracy, each with its 95% interval and its paired difference from ``original``), the Spearman
    correlation of search loss with downstream quality (per calibration set, whose losses share a
    scale), and the paper's claims checked with paired tests:

    - ``best`` (enumeration) against every other strategy downstream, at each r and calibration set;
    - each domain's calibration set against ``general`` on that domain, for ``best``;
    - dynamic skipping's share of second-expert evaluations removed and its cost (from ``reference``,
      the default run's benchmark metrics, when given).
    """
    if not runs:
        raise PipelineError("compare: no finished grid run to summarise")
    ppl_tasks = perplexity_tasks(runs[0]["benchmark"])
    results = {run["name"]: _result(run) for run in runs}   # per-document scores parsed once per run
    rows = []
    for run in runs:
        entry = run["benchmark"]["variants"][PRUNED]
        vs = _paired(original, results[run["name"]])
        row = {k: run[k] for k in ("name", "strategy", "r", "calibration", "search_loss", "layer_loss", "baseline_loss",
                                   "search_seconds", "mlflow_runs")}
        row["shared_with"] = run.get("shared_with")
        row["average_accuracy"] = entry["average_accuracy"]
        row["average_accuracy_interval"] = entry.get("average_accuracy_interval")
        row["average_accuracy_vs_original"] = vs["average_accuracy"]
        row["bits_per_byte"] = {task_domain(t): entry["tasks"][t].get("bits_per_byte") for t in ppl_tasks}
        row["bits_per_byte_interval"] = {task_domain(t): (entry.get("intervals") or {}).get(t, {}).get("bits_per_byte")
                                         for t in ppl_tasks}
        row["bits_per_byte_vs_original"] = {task_domain(t): vs["tasks"].get(t, {}).get("bits_per_byte") for t in ppl_tasks}
        row["mean_bits_per_byte"] = float(np.mean([v for v in row["bits_per_byte"].values() if v is not None]))
        rows.append(row)

    correlation: dict[str, Any] = {}
    for calibration in sorted({r["calibration"] for r in rows}):
        sel = [r for r in rows if r["calibration"] == calibration]
        loss = [r["search_loss"] for r in sel]
        correlation[calibration] = {
            "mean_bits_per_byte": _spearman(loss, [r["mean_bits_per_byte"] for r in sel]),
            **{f"bits_per_byte.{d}": _spearman(loss, [r["bits_per_byte"][d] for r in sel]) for d in sel[0]["bits_per_byte"]},
            "average_accuracy": _spearman(loss, [r["average_accuracy"] for r in sel]),
        }

    by_key = {(r["strategy"], r["r"], r["calibration"]): run for r, run in zip(rows, runs, strict=True)}
    versus: list[dict[str, Any]] = []
    for (strategy, r, calibration), run in sorted(by_key.items(), key=lambda kv: (kv[0][2], -kv[0][1], kv[0][0])):
        ref = by_key.get((best, r, calibration))
        if strategy == best or ref is None:
            continue
        vs = _paired(results[ref["name"]], results[run["name"]])   # other strategy minus the best one: > 0 bits/byte = best is better
        versus.append({
            "strategy": strategy, "r": r, "calibration": calibration,
            "search_loss_ratio": run["search_loss"] / ref["search_loss"] if ref["search_loss"] else None,
            "bits_per_byte": {task_domain(t): vs["tasks"].get(t, {}).get("bits_per_byte") for t in ppl_tasks},
            "average_accuracy": vs["average_accuracy"],
        })

    domain_calibration: list[dict[str, Any]] = []
    for (strategy, r, calibration), run in sorted(by_key.items(), key=lambda kv: (kv[0][2], -kv[0][1])):
        general = by_key.get((strategy, r, "general"))
        if strategy != best or calibration == "general" or general is None:
            continue
        vs = _paired(results[general["name"]], results[run["name"]])   # domain-calibrated minus general: < 0 bits/byte = it helps
        domain_calibration.append({
            "calibration": calibration, "r": r, "strategy": strategy,
            "bits_per_byte": {task_domain(t): vs["tasks"].get(t, {}).get("bits_per_byte") for t in ppl_tasks},
            "average_accuracy": vs["average_accuracy"],
        })

    return {
        "rows": rows,
        "spearman": correlation,
        "versus_best": {"best": best, "comparisons": versus},
        "domain_calibration": domain_calibration,
        "skipping": skipping_claim(reference) if reference else None,
    }


def skipping_claim(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """From a benchmark's metrics: the share of the non-first expert evaluations each ``*_skip``
    variant removes, and its paired cost against ``original``."""
    out: dict[str, Any] = {}
    for name, entry in metrics.get("variants", {}).items():
        if not name.endswith("_skip") or entry.get("expert_evals_per_token") is None:
            continue
        base = metrics["variants"].get(name.removesuffix("_skip"), {})
        k = (base.get("expert_evals_per_token") or 0.0)
        evals = entry["expert_evals_per_token"]
        out[name] = {
            "expert_evals_per_token": evals,
            "without_skipping": k or None,
            "removed_share_of_later_experts": (k - evals) / (k - 1.0) if k and k > 1.0 else None,
            "vs_original": entry.get("vs_original"),
        }
    return out or None


# --------------------------------------------------------------------------- rendering


def _num(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _ci(interval: Mapping[str, float] | None, spec: str, scale: float = 1.0) -> str:
    return "" if not interval else f" [{interval['low'] * scale:{spec}}, {interval['high'] * scale:{spec}}]"


def _diff(c: Mapping[str, Any] | None, spec: str, scale: float = 1.0) -> str:
    if not c:
        return "n/a"
    return f"{c['difference'] * scale:+{spec}}{_ci(c.get('interval'), '+' + spec, scale)} {c['verdict']}"


def render_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown: the grid table, the correlations and the claims with their verdicts."""
    rows = summary["rows"]
    domains = list(rows[0]["bits_per_byte"])
    lines = ["## Grid: search loss and downstream quality of the pruned model", "",
             "Bits per byte (lower is better) and average multiple-choice accuracy of each run's pruned model, "
             "with 95% intervals; the difference from the unpruned original is paired over the same documents "
             "(bootstrap; McNemar for accuracy).", ""]
    head = ["run", "search loss", *[f"{d} bits/byte" for d in domains], *[f"{d} vs original" for d in domains],
            "avg accuracy", "accuracy vs original"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["calibration"], -r["r"], r["search_loss"])):
        label = f"{r['strategy']} r={r['r']} {r['calibration']}"
        if r.get("shared_with"):
            label += f" (same experts as {r['shared_with'].split('-')[1]})"
        cells = [label, f"{r['search_loss']:.4g}"]
        cells += [_num(r["bits_per_byte"][d], ".3f") + _ci(r["bits_per_byte_interval"][d], ".3f") for d in domains]
        cells += [_diff(r["bits_per_byte_vs_original"][d], ".3f") for d in domains]
        cells += [f"{r['average_accuracy'] * 100:.1f}%" + _ci(r["average_accuracy_interval"], ".1f", 100),
                  _diff(r["average_accuracy_vs_original"], ".1f", 100) + (" pp" if r["average_accuracy_vs_original"] else "")]
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Does a lower search loss mean a better model downstream?", "",
              "Spearman's rho between the layer-summed search loss and each downstream measure, across the "
              "grid's runs of one calibration set (losses of different sets are on different tokens). A "
              "positive rho with bits per byte (and a negative one with accuracy) is what the method assumes.", "",
              "| calibration | measure | rho | p-value | runs |", "|---|---|---|---|---|"]
    for calibration, measures in summary["spearman"].items():
        for measure, s in measures.items():
            lines.append(f"| {calibration} | {measure} | {_num(s['rho'], '+.2f')} | {_num(s['p_value'], '.2g')} | {s['n']} |")

    best = summary["versus_best"]["best"]
    lines += ["", f"## {best} against every other strategy, downstream", "",
              f"Each cell: that strategy's pruned model minus {best}'s, paired over documents (bits per byte: "
              f"positive means {best} is better; accuracy in points: negative means {best} is better).", "",
              "| calibration | r | strategy | loss / " + best + "'s | " + " | ".join(f"{d} bits/byte" for d in domains)
              + " | avg accuracy |", "|" + "---|" * (5 + len(domains))]
    for c in summary["versus_best"]["comparisons"]:
        lines.append(f"| {c['calibration']} | {c['r']} | {c['strategy']} | {_num(c['search_loss_ratio'], '.2f')} | "
                     + " | ".join(_diff(c["bits_per_byte"][d], ".3f") for d in domains)
                     + f" | {_diff(c['average_accuracy'], '.1f', 100)} |")

    if summary["domain_calibration"]:
        lines += ["", "## Domain calibration against the general mixture", "",
                  "The same strategy calibrated on one domain minus calibrated on the general mixture, paired "
                  "(bits per byte: negative means the domain set helps).", "",
                  "| calibration | r | " + " | ".join(f"{d} bits/byte" for d in domains) + " | avg accuracy |",
                  "|" + "---|" * (3 + len(domains))]
        for c in summary["domain_calibration"]:
            lines.append(f"| {c['calibration']} | {c['r']} | " + " | ".join(_diff(c["bits_per_byte"][d], ".3f") for d in domains)
                         + f" | {_diff(c['average_accuracy'], '.1f', 100)} |")

    if summary.get("skipping"):
        lines += ["", "## Dynamic skipping (the default run's benchmark)", "",
                  "| variant | experts per token | without skipping | later-expert evaluations removed |", "|---|---|---|---|"]
        for name, s in summary["skipping"].items():
            share = s["removed_share_of_later_experts"]
            lines.append(f"| {name} | {s['expert_evals_per_token']:.2f} | {_num(s['without_skipping'], '.2f')} | "
                         f"{'n/a' if share is None else f'{share * 100:.0f}%'} |")
    return "\n".join(lines) + "\n"


def plot(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Search loss against each domain's bits per byte and the average accuracy, one marker per strategy,
    one panel row per calibration set, 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    domains = list(rows[0]["bits_per_byte"])
    calibrations = sorted({r["calibration"] for r in rows})
    strategies = sorted({r["strategy"] for r in rows})
    markers = dict(zip(strategies, "os^vD<>ph*", strict=False))
    fig, axes = plt.subplots(len(calibrations), len(domains) + 1, figsize=(4.2 * (len(domains) + 1), 3.6 * len(calibrations)),
                             squeeze=False)
    for i, calibration in enumerate(calibrations):
        sel = [r for r in rows if r["calibration"] == calibration]
        for j, measure in enumerate([*domains, "accuracy"]):
            ax = axes[i][j]
            for strategy in strategies:
                pts = [r for r in sel if r["strategy"] == strategy]
                if not pts:
                    continue
                x = [r["search_loss"] for r in pts]
                if measure == "accuracy":
                    y = [r["average_accuracy"] * 100 for r in pts]
                    ivs = [r["average_accuracy_interval"] for r in pts]
                    scale = 100.0
                else:
                    y = [r["bits_per_byte"][measure] for r in pts]
                    ivs = [r["bits_per_byte_interval"][measure] for r in pts]
                    scale = 1.0
                err = np.array([[yy - iv["low"] * scale, iv["high"] * scale - yy] if iv else [0.0, 0.0]
                                for yy, iv in zip(y, ivs, strict=True)]).T
                ax.errorbar(x, y, yerr=err, fmt=markers[strategy], capsize=2, label=strategy, alpha=0.85)
            ax.set_xscale("log")
            ax.set_xlabel(f"search loss (calibration: {calibration})")
            ax.set_ylabel("average accuracy (%)" if measure == "accuracy" else f"{measure} bits per byte")
            rho = summary["spearman"][calibration]["average_accuracy" if measure == "accuracy" else f"bits_per_byte.{measure}"]["rho"]
            ax.set_title(f"{measure}: Spearman rho {_num(rho, '+.2f')}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Search loss vs downstream quality of the pruned model (95% intervals)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def flat_summary_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Numeric summary values for MLflow: each Spearman rho and each run's loss and quality."""
    flat = {f"spearman.{c}.{m}": s["rho"] for c, ms in summary["spearman"].items() for m, s in ms.items()
            if s["rho"] is not None}
    for r in summary["rows"]:
        flat[f"{r['name']}.search_loss"] = r["search_loss"]
        flat[f"{r['name']}.mean_bits_per_byte"] = r["mean_bits_per_byte"]
        flat[f"{r['name']}.average_accuracy"] = r["average_accuracy"]
    return {k: float(v) for k, v in flat.items() if v is not None and math.isfinite(float(v))}


def grid_params(grid: Grid) -> dict[str, Any]:
    """The grid as flat MLflow params."""
    return {
        "strategies": ",".join(sorted({p.strategy for p in grid.points})),
        "r": ",".join(str(r) for r in sorted({p.r for p in grid.points})),
        "calibration": ",".join(sorted({p.calibration for p in grid.points})),
        "runs": len(grid.points),
        **{f"override.{k}": v for k, v in flatten(dict(grid.overrides)).items()},
    }
