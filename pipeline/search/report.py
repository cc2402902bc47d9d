"""Outputs of a search: selection.json, tables, plots (PNG + JSON data for DVC) and metrics."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io import atomic_write_text, write_json
from pipeline.config import SearchParams
from pipeline.search.run import LayerResult

#: Above this many candidates per layer the DVC data file holds quantiles instead of every loss.
MAX_POINTS_PER_LAYER = 1000
QUANTILES = 201
MARKERS = {"frequency": ("^", "tab:blue"), "random": ("s", "tab:orange"), "reap": ("D", "tab:green")}


def kept_label(kept: Sequence[int]) -> str:
    """``[0, 3, 5]`` -> ``"0-3-5"`` (a CSV-friendly set label)."""
    return "-".join(str(e) for e in kept)


def selection(
    results: Sequence[LayerResult],
    settings: SearchParams,
    *,
    calibration: str,
    model_fingerprint: str,
    num_experts: int,
    top_k: int,
) -> dict[str, Any]:
    """The ``selection.json`` document (docs/architecture.md)."""
    strategies = sorted({r.strategy for r in results})
    doc = {
        "strategy": strategies[0] if len(strategies) == 1 else settings.strategy,
        "requested_strategy": settings.strategy,
        "mode": settings.mode,
        "r": settings.r,
        "calibration": calibration,
        "model_fingerprint": model_fingerprint,
        "num_experts": num_experts,
        "top_k": top_k,
        "loss_batch_size": settings.loss_batch_size,
        "layers": [
            {
                "layer": r.layer,
                "kept": list(r.kept),
                "loss": r.loss,
                "candidates_evaluated": r.candidates_evaluated,
                "baselines": {name: {"kept": list(b["kept"]), "loss": b["loss"]} for name, b in r.baselines.items()},
            }
            for r in results
        ],
    }
    if settings.allocation == "global":
        doc["allocation"] = "global"
        doc["total_experts"] = sum(len(r.kept) for r in results)
        for entry, r in zip(doc["layers"], results, strict=True):
            entry["r"] = len(r.kept)
            entry["relative_loss"] = r.loss / r.output_norm if r.output_norm else None
            entry["output_norm"] = r.output_norm
            entry["curve"] = r.curve
    return doc


def _csv(rows: list[list[Any]], header: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_tables(folder: Path, results: Sequence[LayerResult]) -> list[Path]:
    """``candidates.csv`` (every scored ``r``-set per layer, ranked) and ``baselines.csv``."""
    folder.mkdir(parents=True, exist_ok=True)
    cand_rows: list[list[Any]] = []
    base_rows: list[list[Any]] = []
    for res in results:
        losses = res.losses.tolist()
        kept = res.candidates.tolist()
        order = sorted(range(len(losses)), key=lambda i: (losses[i], kept[i]))
        for rank, i in enumerate(order, start=1):
            cand_rows.append([res.layer, kept_label(kept[i]), repr(losses[i]), rank, int(kept[i] == res.kept)])
        base_rows.append([res.layer, res.strategy, kept_label(res.kept), repr(res.loss), "1.0"])
        for name, b in res.baselines.items():
            rel = b["loss"] / res.loss if res.loss > 0 else float("inf")
            base_rows.append([res.layer, name, kept_label(b["kept"]), repr(b["loss"]), repr(rel)])
    paths = [folder / "candidates.csv", folder / "baselines.csv"]
    atomic_write_text(paths[0], _csv(cand_rows, ["layer", "kept", "loss", "rank", "chosen"]))
    atomic_write_text(paths[1], _csv(base_rows, ["layer", "method", "kept", "loss", "loss_vs_chosen"]))
    return paths


def metrics(results: Sequence[LayerResult], seconds: float) -> tuple[dict[str, Any], dict[str, float]]:
    """``(metrics.json document, flat MLflow metrics)``."""
    names = sorted({name for r in results for name in r.baselines})
    doc: dict[str, Any] = {
        "loss": sum(r.loss for r in results),
        "baselines": {name: sum(r.baselines[name]["loss"] for r in results if name in r.baselines) for name in names},
        "candidates_evaluated": sum(r.candidates_evaluated for r in results),
        "seconds": round(seconds, 3),
        "layers": {},
    }
    flat: dict[str, float] = {
        "loss": doc["loss"],
        "candidates_evaluated": doc["candidates_evaluated"],
        "search_seconds": doc["seconds"],
    }
    for name in names:
        flat[f"loss_{name}"] = doc["baselines"][name]
    for r in results:
        entry: dict[str, Any] = {"loss": r.loss, "candidates_evaluated": r.candidates_evaluated, "seconds": r.seconds}
        for name, b in r.baselines.items():
            entry[f"loss_{name}"] = b["loss"]
        if r.verified_loss is not None:
            entry["verified_loss"] = r.verified_loss
        doc["layers"][str(r.layer)] = entry
        for key, value in entry.items():
            flat[f"layer_{r.layer:03d}.{key}"] = value
    return doc, flat


# -- plots ----------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_plot_data(results: Sequence[LayerResult]) -> dict[str, list[dict[str, Any]]]:
    """DVC plot series: candidate losses (all, or quantiles when many), the chosen set, each baseline."""
    series: dict[str, list[dict[str, Any]]] = {"candidates": [], "chosen": []}
    for res in results:
        losses = np.asarray(res.losses.tolist(), dtype=np.float64)
        if losses.size <= MAX_POINTS_PER_LAYER:
            series["candidates"] += [{"layer": res.layer, "loss": float(v)} for v in np.sort(losses)]
        else:
            qs = np.linspace(0.0, 1.0, QUANTILES)
            series["candidates"] += [
                {"layer": res.layer, "loss": float(v), "quantile": float(q)} for q, v in zip(qs, np.quantile(losses, qs), strict=True)
            ]
        series["chosen"].append({"layer": res.layer, "loss": res.loss, "kept": kept_label(res.kept)})
        for name, b in res.baselines.items():
            series.setdefault(name, []).append({"layer": res.layer, "loss": b["loss"], "kept": kept_label(b["kept"])})
    return series


def plot_losses(folder: Path, results: Sequence[LayerResult], *, strategy: str, r: int, n: int) -> Any:
    """``loss_distribution.png``: per layer, every scored set's loss, the chosen set and the baselines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7.5, 1.1 * len(results) + 4.0), 4.5), dpi=110)
    rng = np.random.default_rng(0)
    positions = np.arange(len(results))
    for pos, res in zip(positions, results, strict=True):
        losses = np.asarray(res.losses.tolist(), dtype=np.float64)
        if losses.size > 200:
            parts = ax.violinplot([losses], positions=[pos], widths=0.8, showextrema=True)
            for body in parts["bodies"]:
                body.set_facecolor("0.75")
                body.set_alpha(0.7)
        else:
            jitter = rng.uniform(-0.25, 0.25, size=losses.size)
            ax.scatter(pos + jitter, losses, s=9, color="0.6", alpha=0.7, label="candidates" if pos == 0 else None)
        ax.scatter([pos], [res.loss], marker="*", s=180, color="tab:red", zorder=4, label=f"chosen ({strategy})" if pos == 0 else None)
        for name, b in res.baselines.items():
            marker, color = MARKERS.get(name, ("o", "black"))
            ax.scatter([pos + 0.3], [b["loss"]], marker=marker, s=45, color=color, zorder=3, label=name if pos == 0 else None)
    ax.set_xticks(positions, [str(res.layer) for res in results])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("loss = sum over batches of ||Z - Z_hat||_F")
    ax.set_title(f"Reconstruction loss of kept sets ({r} of {n} experts)")
    values = [v for res in results for v in res.losses.tolist()] + [res.loss for res in results]
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(folder / "loss_distribution.png")
    return fig


def usage_shares(usage: Mapping[int, Sequence[int]]) -> tuple[list[int], np.ndarray]:
    """``(layers, share [layers, n])``: each expert's share of its layer's routing slots."""
    layers = sorted(usage)
    counts = np.asarray([usage[i] for i in layers], dtype=np.float64)
    totals = counts.sum(1, keepdims=True)
    return layers, counts / np.where(totals > 0, totals, 1.0)


def plot_usage(folder: Path, name: str, usage: Mapping[int, Sequence[int]], kept: Mapping[int, Sequence[int]] | None) -> Any:
    """``usage.png``: heatmap of routing shares (layers x experts); dropped experts crossed out."""
    plt = _pyplot()
    layers, shares = usage_shares(usage)
    n = shares.shape[1]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * n + 2.5), max(3.0, 0.4 * len(layers) + 1.8)), dpi=110)
    image = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of routing slots")
    if kept:
        for row, layer in enumerate(layers):
            dropped = [e for e in range(n) if e not in set(kept.get(layer, range(n)))]
            ax.scatter(dropped, [row] * len(dropped), marker="x", color="white", s=30, linewidths=1.2)
    ax.set_xticks(range(n))
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("expert" + (" (x = pruned)" if kept else ""))
    ax.set_ylabel("MoE layer")
    ax.set_title(f"Expert usage on calibration set '{name}'")
    fig.tight_layout()
    fig.savefig(folder / "usage.png")
    return fig


def plot_budget(folder: Path, results: Sequence[LayerResult], *, r: int, n: int) -> Any:
    """``budget.png`` (``search.allocation: global``): experts kept per layer, and each layer's relative loss curve."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.2), dpi=110)
    layers = [res.layer for res in results]
    left.bar(range(len(layers)), [len(res.kept) for res in results], color="tab:blue", label="global")
    left.axhline(r, color="tab:red", linestyle="--", label=f"uniform (r = {r})")
    left.set_xticks(range(len(layers)), [str(i) for i in layers])
    left.set_ylim(0, n + 0.5)
    left.set_xlabel("MoE layer")
    left.set_ylabel(f"experts kept (of {n})")
    left.set_title(f"Per-layer counts: {sum(len(res.kept) for res in results)} experts in all")
    left.legend(fontsize=8, frameon=False)
    for res in results:
        points = [(p["r"], p["loss"] / res.output_norm) for p in res.curve or [] if res.output_norm]
        if points:
            line = right.plot(*zip(*points, strict=True), marker="o", markersize=3, label=f"layer {res.layer}")[0]
            right.scatter([len(res.kept)], [res.loss / res.output_norm], s=80, color=line.get_color(), marker="*", zorder=3)
    right.set_xlabel("experts kept r")
    right.set_ylabel("relative loss L_l(r) / sum_b ||Z_b||_F")
    right.set_title("Loss curves (star: the allocation)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, frameon=False, ncol=2)
    fig.tight_layout()
    fig.savefig(folder / "budget.png")
    return fig


def write_plots(
    folder: Path,
    results: Sequence[LayerResult],
    usage: Mapping[int, Sequence[int]],
    *,
    search_set: str,
    strategy: str,
    r: int,
    n: int,
) -> list[Path]:
    """Write PNGs into ``folder`` and their data into ``folder/data``; return the files written.

    ``usage`` is the original model's expert usage per layer on the search's calibration set.
    """
    plt = _pyplot()
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for key, rows in loss_plot_data(results).items():
        written.append(write_json(data / f"loss_{key}.json", rows))
    figures = {"loss_distribution.png": plot_losses(folder, results, strategy=strategy, r=r, n=n)}
    kept = {res.layer: res.kept for res in results}
    layers, shares = usage_shares(usage)
    rows = [{"layer": layer, "expert": e, "share": float(shares[i, e])} for i, layer in enumerate(layers) for e in range(shares.shape[1])]
    written.append(write_json(data / "usage.json", rows))
    figures["usage.png"] = plot_usage(folder, search_set, usage, kept)
    if any(res.curve for res in results):
        rows = [
            {"layer": res.layer, "r": p["r"], "relative_loss": p["loss"] / res.output_norm, "chosen": p["r"] == len(res.kept)}
            for res in results if res.output_norm for p in res.curve or []
        ]
        written.append(write_json(data / "budget.json", rows))
        figures["budget.png"] = plot_budget(folder, results, r=r, n=n)
    for name, fig in figures.items():
        plt.close(fig)
        written.append(folder / name)
    return written
