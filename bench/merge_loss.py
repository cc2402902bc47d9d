"""Reconstruction loss per MoE layer, pruned vs pruned + merged, for each merging method.

Reads the model stage's checkpoint, the activations stage's cached MoE inputs and one or more
``selection.json`` files (the search's kept sets, e.g. one per ``search.r``); for every selection,
layer and method of ``pipeline.merging.METHODS`` it merges on the cached inputs exactly as the export
does (``pipeline.merging.merge_layer``) and prints ``sum_b ||Z_b - Z_hat_b||_F`` of the pruned block,
of the merged block at full strength and at the strength the export keeps (``b`` =
``loss_batch_size`` calibration sequences, the search's loss). Writes nothing but ``--json``.

    .venv/bin/python bench/merge_loss.py outputs/search/selection.json [more selection.json ...] --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.activations import ActivationCache  # noqa: E402
from pipeline.export import Selection, validate_for_model  # noqa: E402
from pipeline.merging import METHODS, merge_layer  # noqa: E402
from pipeline.models import get_adapter  # noqa: E402
from pipeline.models.loading import ModelManifest, load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("selections", nargs="+", type=Path)
    parser.add_argument("--outputs", type=Path, default=REPO / "outputs")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    manifest = ModelManifest.load(args.outputs / "model" / "manifest.json")
    model = load_model(manifest.path, experts_implementation="eager")
    adapter = get_adapter(model.config)
    cache = ActivationCache(args.outputs / "activations", manifest.fingerprint)
    rows = []
    print(f"{'r':>2} {'layer':>5} {'method':>7} {'pruned':>12} {'full':>12} {'full/pruned':>11} {'strength':>8} "
          f"{'kept':>12} {'kept/pruned':>11}")
    for path in args.selections:
        selection = Selection.load(path)
        validate_for_model(selection, model, adapter, manifest.fingerprint)
        pruned_config = adapter.pruned_config(model.config, selection.r)
        for layer, kept in selection.kept.items():
            block = adapter.moe_block(adapter.decoder_layers(model)[layer])
            x = cache.load(layer)
            pruned = adapter.prune_block(block, kept, pruned_config, layer)
            for method in args.methods.split(","):
                m = merge_layer(adapter, block, pruned, model.config, x, kept, method, layer,
                                batch_sequences=selection.loss_batch_size)
                lp, lf, lm = m.loss_pruned, m.loss_by_strength[1.0], m.loss_merged
                rows.append({"r": selection.r, "layer": layer, "method": method, "pruned": lp, "full": lf, "merged": lm,
                             "strength": m.strength, "assignment": {str(j): k for j, k in m.assignment.items()}})
                print(f"{selection.r:>2} {layer:>5} {method:>7} {lp:>12.6g} {lf:>12.6g} {lf / lp:>11.3f} "
                      f"{m.strength:>8g} {lm:>12.6g} {lm / lp:>11.3f}")
    for r in sorted({row["r"] for row in rows}, reverse=True):
        for method in args.methods.split(","):
            sel = [row for row in rows if row["r"] == r and row["method"] == method]
            lp, lf, lm = (sum(row[key] for row in sel) for key in ("pruned", "full", "merged"))
            print(f"{r:>2} {'all':>5} {method:>7} {lp:>12.6g} {lf:>12.6g} {lf / lp:>11.3f} {'':>8} {lm:>12.6g} "
                  f"{lm / lp:>11.3f}")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
