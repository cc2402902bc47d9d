"""Global vs uniform expert budgets at equal total experts, by the search's own loss (method.md §10).

Runs the layerwise search with ``search.allocation: global`` on a reproduced project's cached
activations (one search gives both: its size-``r`` result is the uniform allocation, kept as the
baseline ``uniform``) and prints, per ``r``, the per-layer counts and the summed raw and relative
losses of both allocations. With ``--export DIR`` it also writes both checkpoints per ``r``
(``DIR/r<r>_<allocation>``) and their selection.json files, for the benchmark.

    .venv/bin/python bench/allocation.py /tmp/budsnap --r 6 4 3 [--export /tmp/alloc]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.activations import ActivationCache  # noqa: E402
from pipeline.config import SearchParams, load_params  # noqa: E402
from pipeline.export import Selection, export_pruned  # noqa: E402
from pipeline.models import get_adapter  # noqa: E402
from pipeline.models.loading import ModelManifest, load_model, load_tokenizer  # noqa: E402
from pipeline.search import report  # noqa: E402
from pipeline.search.allocation import allocate  # noqa: E402
from pipeline.search.run import LayerResult, run_layerwise  # noqa: E402


def _uniform(results: list[LayerResult]) -> list[LayerResult]:
    from dataclasses import replace

    return [replace(r, kept=r.baselines["uniform"]["kept"], loss=r.baselines["uniform"]["loss"],
                    baselines={k: v for k, v in r.baselines.items() if k != "uniform"}) for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--r", type=int, nargs="+", default=[6, 4, 3])
    parser.add_argument("--export", type=Path, default=None)
    args = parser.parse_args()
    project = args.project.resolve()
    params = load_params(project / "params.yaml")
    manifest = ModelManifest.load(project / "outputs/model/manifest.json")
    checkpoint = project / manifest.path
    cache = ActivationCache(project / "outputs/activations", manifest.fingerprint)
    torch.manual_seed(0)
    rows = []
    for r in args.r:
        settings = SearchParams(**{**params.search.model_dump(), "r": r, "allocation": "global", "verify": False})
        model = load_model(checkpoint)
        adapter = get_adapter(model.config)
        started = time.perf_counter()
        searched = run_layerwise(model, adapter, model.config, cache.layers, cache.load, settings)
        seconds = time.perf_counter() - started
        glob = allocate(searched, r)
        uniform = _uniform(glob)
        row = {"r": r, "seconds": round(seconds, 1)}
        for name, results in (("uniform", uniform), ("global", glob)):
            row[name] = {
                "counts": [len(x.kept) for x in results],
                "loss": sum(x.loss for x in results),
                "relative_loss": sum(x.loss / x.output_norm for x in results),
            }
            if args.export is not None:
                uniform_settings = settings.model_copy(update={"allocation": name})
                doc = report.selection(results, uniform_settings, calibration=settings.calibration,
                                       model_fingerprint=manifest.fingerprint, num_experts=manifest.num_experts,
                                       top_k=manifest.top_k)
                out = args.export / f"r{r}_{name}"
                out.mkdir(parents=True, exist_ok=True)
                (out / "selection.json").write_text(json.dumps(doc, indent=2))
                fresh = load_model(checkpoint)
                export_pruned(fresh, adapter, Selection.from_dict(doc), out / "model", tokenizer=load_tokenizer(checkpoint),
                              source=manifest.source, source_fingerprint=manifest.fingerprint, progress=False)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| r | uniform counts | global counts | uniform relative loss | global relative loss | uniform raw loss | global raw loss |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for row in rows:
        u, g = row["uniform"], row["global"]
        print(f"| {row['r']} | {u['counts']} | {g['counts']} | {u['relative_loss']:.4f} | {g['relative_loss']:.4f} | "
              f"{u['loss']:.4g} | {g['loss']:.4g} |")


if __name__ == "__main__":
    main()
