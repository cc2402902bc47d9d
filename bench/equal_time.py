"""Beam vs evolutionary search at equal wall time, per layer, on a reproduced project (method.md §4, §8).

For every MoE layer and every ``r``, one round times the beam search of the layer (``search_layer``
with ``search.strategy: beam``, no baselines, no verification: the scorer's setup is inside the
time), then runs the evolutionary search of the same layer with a fresh seed and records its best
loss so far after every scoring call, from the same starting point (its scorer's dense pass
included). The evolutionary search is stopped at ``--stretch`` times beam's time. Reported per layer
and ``r``: beam's time and loss, the evolutionary best loss at beam's time and at ``--stretch`` times
it, and, over the rounds x layers of each ``r``, the median ratio (evolutionary / beam) with its 95%
bootstrap interval (``pipeline.evaluate.stats.speedup``, the same statistic as the benchmark's
speed-up: rounds x layers are its "rounds"). A ratio above 1 means beam found the lower loss.

    .venv/bin/python bench/equal_time.py /work/fg --rounds 3 --threads 1 [--r 32 16] [--out DIR]

With ``--out`` it writes equal_time.json and equal_time.md there and logs them, with the summary as
metrics, as one MLflow run ``equal-time-evidence`` in the project's store (tagged with the model
stage's run id). ``--r`` defaults to n/2 and n/4 of the project's model. The project needs `dvc repro` through the
activations stage (outputs/model, outputs/activations).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline.activations import ActivationCache  # noqa: E402
from pipeline.config import SearchParams  # noqa: E402
from pipeline.evaluate import stats  # noqa: E402
from pipeline.io import atomic_dir, atomic_write_text, write_json  # noqa: E402
from pipeline.models import get_adapter  # noqa: E402
from pipeline.models.loading import ModelManifest, load_model  # noqa: E402
from pipeline.search.evolutionary import evolutionary_search  # noqa: E402
from pipeline.search.run import search_layer  # noqa: E402
from pipeline.search.scoring import LayerScorer  # noqa: E402
from pipeline.search.strategies import LayerProblem  # noqa: E402
from pipeline.tracking import default_tracking_uri  # noqa: E402

from _evidence import cli, log_evidence_run  # noqa: E402  (bench/ is on sys.path as the script's folder)


class _TimeUp(Exception):
    """Raised by the fitness wrapper once the evolutionary search has had its time."""


def _evolutionary_trace(adapter, block, config, x, settings: SearchParams, layer: int, seed: int,
                        limit: float) -> list[tuple[float, float]]:
    """(seconds since start, best loss so far) after each scoring call (one generation), until ``limit`` seconds."""
    started = time.perf_counter()
    scorer = LayerScorer(adapter, block, config, x, tokens_per_batch=settings.loss_batch_size * x.shape[1],
                         token_chunk=settings.token_chunk)
    problem = LayerProblem(scorer, adapter.block_num_experts(block), settings, layer)
    trace: list[tuple[float, float]] = []
    best = float("inf")

    def fitness(kept: torch.Tensor) -> torch.Tensor:
        nonlocal best
        losses = problem.losses(kept)
        best = min(best, float(losses.min()))
        elapsed = time.perf_counter() - started
        trace.append((elapsed, best))
        if elapsed >= limit:
            raise _TimeUp
        return losses

    try:
        evolutionary_search(fitness, problem.n, settings.r, settings.evolutionary, seed=[seed, layer])
    except _TimeUp:
        pass
    finally:
        scorer.close()
    return trace


def _best_at(trace: list[tuple[float, float]], seconds: float) -> float:
    """The best loss found within ``seconds`` (inf if nothing was scored by then)."""
    found = [loss for t, loss in trace if t <= seconds]
    return found[-1] if found else float("inf")


def log_evidence(project: Path, experiment: str, args: argparse.Namespace, summary: list[dict], files: list[Path]) -> str | None:
    """One MLflow run ``equal-time-evidence`` in the project's store with the summary; returns its id."""
    metrics = {}
    for e in summary:
        for key in ("evolutionary_at_beam_time", "evolutionary_at_stretch"):
            c = e[key]
            if c is not None:
                metrics[f"r{e['r']}.{key}.ratio"] = c["ratio"]
                if c["interval"] is not None:
                    metrics[f"r{e['r']}.{key}.ratio_lo"], metrics[f"r{e['r']}.{key}.ratio_hi"] = c["interval"]
        metrics[f"r{e['r']}.beam_better_pairs"] = e["beam_better_pairs"]
    return log_evidence_run(project, "equal-time-evidence", experiment, "bench/equal_time.py",
                            params={"r": [e["r"] for e in summary], "rounds": args.rounds, "stretch": args.stretch,
                                    "threads": args.threads},
                            metrics=metrics, files=files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--r", type=int, nargs="+", default=None, help="experts kept (default: n/2 and n/4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per layer and r (one evolutionary seed each)")
    parser.add_argument("--stretch", type=float, default=2.0, help="evolutionary runs this many times beam's time")
    parser.add_argument("--budget", type=int, default=1_000_000, help="evolutionary candidates at most (the time stops it first)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write equal_time.json and equal_time.md here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    project = args.project.resolve()
    raw = yaml.safe_load((project / "params.yaml").read_text())
    search = SearchParams(**raw["search"])  # only the sections used here are validated
    manifest = ModelManifest.load(project / "outputs/model/manifest.json")
    cache = ActivationCache(project / "outputs/activations", manifest.fingerprint)
    model = load_model(project / manifest.path)
    adapter = get_adapter(model.config)
    decoder = adapter.decoder_layers(model)
    n = manifest.num_experts
    rs = args.r or [n // 2, n // 4]
    base = search.model_dump()
    rows = []
    for r in rs:
        beam = SearchParams(**{**base, "r": r, "strategy": "beam", "baselines": [], "verify": False})
        evo = SearchParams(**{**base, "r": r, "strategy": "evolutionary", "baselines": [], "verify": False,
                              "evolutionary": {**base["evolutionary"], "budget": args.budget}})
        for layer in cache.layers:
            x = cache.load(layer)
            block = adapter.moe_block(decoder[layer])
            for round_ in range(args.rounds):
                started = time.perf_counter()
                found = search_layer(adapter, block, model.config, x, layer, beam, seq_len=x.shape[1])
                seconds = time.perf_counter() - started
                trace = _evolutionary_trace(adapter, block, model.config, x, evo, layer, seed=round_,
                                            limit=args.stretch * seconds)
                row = {"r": r, "layer": layer, "round": round_, "beam_seconds": round(seconds, 3),
                       "beam_loss": found.loss, "evolutionary_at_beam_time": _best_at(trace, seconds),
                       "evolutionary_at_stretch": _best_at(trace, args.stretch * seconds),
                       "evolutionary_sets_by_beam_time": len([t for t, _ in trace if t <= seconds]) * evo.evolutionary.population}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = []
    for r in rs:
        mine = [x for x in rows if x["r"] == r]
        entry = {"r": r, "pairs": len(mine)}
        for key in ("evolutionary_at_beam_time", "evolutionary_at_stretch"):
            s = stats.speedup([x["beam_loss"] for x in mine], [x[key] for x in mine])
            verdict = None if s is None else {stats.FASTER: "beam better", stats.SLOWER: "evolutionary better"}.get(
                s.verdict, s.verdict)
            entry[key] = None if s is None else {"ratio": s.ratio, "interval": s.interval, "verdict": verdict}
        entry["beam_better_pairs"] = sum(x["evolutionary_at_beam_time"] > x["beam_loss"] for x in mine)
        summary.append(entry)
    lines = [
        f"Beam (width {base['beam_width']}) vs evolutionary at equal wall time, {args.rounds} rounds x "
        f"{len(cache.layers)} layers per r, {args.threads} thread(s); ratio = evolutionary loss / beam loss "
        "(> 1: beam better), median with 95% bootstrap interval over rounds x layers.",
        "",
        "| r | layer | beam time (median) | beam loss | evolutionary at beam's time / beam (median, min-max) | "
        f"evolutionary at {args.stretch:g}x beam's time / beam (median) |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    for r in rs:
        for layer in cache.layers:
            mine = [x for x in rows if x["r"] == r and x["layer"] == layer]
            at = sorted(x["evolutionary_at_beam_time"] / x["beam_loss"] for x in mine)
            st = sorted(x["evolutionary_at_stretch"] / x["beam_loss"] for x in mine)
            secs = sorted(x["beam_seconds"] for x in mine)
            lines.append(f"| {r} | {layer} | {secs[len(secs) // 2]:.1f} s | {mine[0]['beam_loss']:.4g} | "
                         f"{at[len(at) // 2]:.3f} ({at[0]:.3f}-{at[-1]:.3f}) | {st[len(st) // 2]:.3f} |")
    lines += ["", "| r | pairs | evolutionary / beam at beam's time [95% CI] | verdict | "
              f"at {args.stretch:g}x beam's time [95% CI] | verdict | pairs where beam is lower |", "|---:|---:|---|---|---|---|---:|"]
    for e in summary:
        cells = []
        for key in ("evolutionary_at_beam_time", "evolutionary_at_stretch"):
            c = e[key]
            interval = "" if c is None or c["interval"] is None else f" [{c['interval'][0]:.3f}, {c['interval'][1]:.3f}]"
            cells += ["no set scored in time", "-"] if c is None else [f"{c['ratio']:.3f}{interval}", str(c["verdict"])]
        lines.append(f"| {e['r']} | {e['pairs']} | {' | '.join(cells)} | {e['beam_better_pairs']} of {e['pairs']} |")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        with atomic_dir(args.out) as out:  # the folder appears only with its MLflow run
            finite = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in x.items()} for x in rows]
            files = [write_json(out / "equal_time.json", {"rows": finite, "summary": summary}),  # null: nothing scored in time
                     atomic_write_text(out / "equal_time.md", text + "\n")]
            run_id = log_evidence(project, raw["tracking"]["experiment"], args, summary, files)
        print(f"MLflow run {run_id} (equal-time-evidence) in {default_tracking_uri(project)}")


if __name__ == "__main__":
    cli(main)
