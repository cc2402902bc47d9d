"""Recovery fine-tuning on the embedded default: the fraction of the original-vs-pruned perplexity gap
that distillation closes, per domain, with 95% intervals, and its wall time; router-only vs LoRA.

Reads a reproduced project's outputs (the model stage's checkpoint, the activations cache, the
calibration sets, the corpus stage's lm-eval tasks). For each ``--r`` it searches every layer by
exact enumeration (the search stage's code), exports the pruned checkpoint (the export stage's code),
then for each ``--targets`` runs ``pipeline.recovery.distil`` with the ``recover.*`` defaults (overridden
by ``--steps``, ``--lr-router``, ``--lr-lora``), and evaluates original, pruned and every recovered model on the
embedded perplexity tasks with lm-eval (the benchmark's code). The gap closed per domain is
``(bpb_pruned - bpb_recovered) / (bpb_pruned - bpb_original)`` with a paired bootstrap over documents
(``pipeline.evaluate.stats.gap_closed``). Writes ``--json``; prints a Markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python bench/recovery.py --outputs /tmp/recsnap/outputs --r 4 3 \\
        --targets router lora --steps 8 --work /tmp/recbench --json /tmp/recovery.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pipeline.activations import ActivationCache  # noqa: E402
from pipeline.calibration import load_calibration_set  # noqa: E402
from pipeline.config import BenchmarkParams, RecoverParams, SearchParams, SpeedParams, section  # noqa: E402
from pipeline.evaluate import stats  # noqa: E402
from pipeline.evaluate.runner import BenchmarkSetup, Variant, run_accuracy  # noqa: E402
from pipeline.export import Selection, export_pruned  # noqa: E402
from pipeline.models import get_adapter  # noqa: E402
from pipeline.models.loading import ModelManifest, load_model, load_tokenizer  # noqa: E402
from pipeline.recovery import describe, distil, learning_rates, save_recovered  # noqa: E402
from pipeline.search import report as search_report  # noqa: E402
from pipeline.search.run import run_layerwise  # noqa: E402

METRIC = "bits_per_byte"


def export_at(r: int, outputs: Path, manifest: ModelManifest, out: Path) -> Path:
    """Search (exact enumeration, layerwise) and export the pruned checkpoint keeping ``r`` experts."""
    if (out / "config.json").is_file():
        return out
    model = load_model(manifest.path)
    adapter = get_adapter(model.config)
    cache = ActivationCache(outputs / "activations", manifest.fingerprint)
    settings = SearchParams(r=r, strategy="enumerate", baselines=[], calibration=cache.calibration)
    results = run_layerwise(model, adapter, model.config, cache.layers, cache.load, settings)
    doc = search_report.selection(results, settings, calibration=cache.calibration, model_fingerprint=manifest.fingerprint,
                                  num_experts=manifest.num_experts, top_k=manifest.top_k)
    export_pruned(model, adapter, Selection.from_dict(doc), out, tokenizer=load_tokenizer(manifest.path),
                  source=manifest.source, source_fingerprint=manifest.fingerprint, progress=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, required=True, help="a reproduced project's outputs/ (absolute path)")
    parser.add_argument("--r", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--targets", nargs="+", default=["router", "lora"])
    parser.add_argument("--steps", type=int, default=None, help="recover.steps (default: the params default)")
    parser.add_argument("--lr-router", type=float, default=None, help="recover.lr_router (default: the params default)")
    parser.add_argument("--lr-lora", type=float, default=None, help="recover.lr_lora (default: the params default)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    manifest = ModelManifest.load(args.outputs / "model" / "manifest.json")
    os.chdir(args.outputs.parent)  # the manifest's path and the lm-eval task files are relative to the project
    defaults = RecoverParams()
    data = load_calibration_set(args.outputs / "calibration" / defaults.calibration, defaults.calibration)
    teacher = load_model(manifest.path)
    variants = [Variant("original", Path(manifest.path))]
    runs = []
    for r in args.r:
        exported = export_at(r, args.outputs, manifest, args.work / f"export_r{r}")
        variants.append(Variant(f"pruned_r{r}", exported, pruned=True))
        for target in args.targets:
            given = {"steps": args.steps, "lr_router": args.lr_router, "lr_lora": args.lr_lora}
            settings = section(RecoverParams, "recover", targets=target,
                               **{k: v for k, v in given.items() if v is not None})
            student = load_model(exported)
            began = time.perf_counter()
            merged, report = distil(teacher, student, get_adapter(student.config), data.input_ids, settings)
            seconds = time.perf_counter() - began
            out = args.work / f"recovered_r{r}_{target}"
            save_recovered(merged, exported, out, recovery=describe(settings, report))
            name = f"recovered_r{r}_{target}"
            variants.append(Variant(name, out, pruned=True))
            lrs = learning_rates(settings)
            runs.append({"name": name, "r": r, "targets": target, "steps": settings.steps, **lrs,
                         "seconds": seconds, "trainable_parameters": report.trainable_parameters,
                         "kl_first": report.curve[0]["kl"], "kl_last": report.curve[-1]["kl"]})
            print(f"{name}: {settings.steps} steps, {lrs}, {seconds:.1f} s, KL {report.curve[0]['kl']:.4f} -> "
                  f"{report.curve[-1]['kl']:.4f} ({report.trainable_parameters} trainable)", flush=True)
    tasks = [f"embedded_{d}_ppl" for d in ("prose", "code", "arith")]
    setup = BenchmarkSetup(BenchmarkParams(tasks=tasks, speed=SpeedParams(prompts=1, new_tokens=1, repeats=1, warmup=0)),
                           torch.device("cpu"), torch.float32, False)
    results = run_accuracy(variants, setup, args.outputs / "corpus" / "eval", args.work / "results")
    original = results["original"]
    table = []
    for run in runs:
        pruned, recovered = results[f"pruned_r{run['r']}"], results[run["name"]]
        run["domains"] = {}
        for task in tasks:
            o, p, c = original.items[task], pruned.items[task], recovered.items[task]
            assert o.doc_ids == p.doc_ids == c.doc_ids
            point, interval = stats.gap_closed(METRIC, o.loglikelihood, p.loglikelihood, c.loglikelihood, o.counts(METRIC))
            entry = {"gap_closed": point, "interval": interval, "documents": len(o.doc_ids),
                     **{f"{METRIC}_{k}": v.tasks[task][METRIC] for k, v in
                        (("original", original), ("pruned", pruned), ("recovered", recovered))}}
            run["domains"][task.split("_")[1]] = entry
            table.append(f"| {run['r']} | {run['targets']} | {task.split('_')[1]} | {entry[f'{METRIC}_original']:.4f} | "
                         f"{entry[f'{METRIC}_pruned']:.4f} | {entry[f'{METRIC}_recovered']:.4f} | {point:.2f} "
                         f"[{interval[0]:.2f}, {interval[1]:.2f}] | {run['seconds']:.1f} |")
    print("| r | targets | domain | bpb original | bpb pruned | bpb recovered | gap closed [95% CI] | recovery s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(table))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"metric": METRIC, "torch_threads": torch.get_num_threads(), "runs": runs},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
