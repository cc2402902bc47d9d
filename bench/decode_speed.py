"""Decoding speed at batch size 1 of a random-weight Mixtral-shaped model: 8 experts, pruned, with skipping.

No downloaded weights: a Mixtral-8x7B-shaped model (hidden 4096, intermediate 14336, 8 experts, top-2,
32 heads / 8 KV heads, vocabulary 32000) with ``--layers`` decoder layers is built at random on
``--device`` in ``--dtype``, with router weights scaled so routing is decisive as in a trained model.
Variants:

* ``8`` (all experts) and ``8+skip``;
* ``6``/``4``: every MoE layer keeps the 6/4 experts most often routed to on the calibration tokens
  (the paper's frequency baseline; which experts are kept does not change the speed), and ``6+skip``/``4+skip``.

Skip thresholds are calibrated as the pipeline's skip_calibration stage does
(:func:`pipeline.skipping.calibrate_thresholds`: the median of ``w2 / w1`` per layer on random
calibration tokens), on each model separately. Speed is measured with the benchmark stage's own
code (:func:`pipeline.evaluate.speed.measure_speed`: greedy ``generate`` at batch size 1, a fixed
number of new tokens, all variants interleaved in every repeat, the order rotating, median of the
repeats). Prints tokens/s, the ratio to ``8``, expert evaluations per token and the skipped share.

    .venv/bin/python bench/decode_speed.py --device cuda --dtype bfloat16 --layers 4          # GPU
    .venv/bin/python bench/decode_speed.py --hidden 1024 --intermediate 3584 --heads 8 --kv-heads 2 \\
        --layers 2 --vocab 4096 --threads 2                                                   # CPU, scaled down
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.evaluate.memory import weight_bytes  # noqa: E402
from pipeline.evaluate.speed import SpeedCase, measure_speed  # noqa: E402
from pipeline.models import get_adapter  # noqa: E402
from pipeline.runtime import resolve_device, resolve_dtype  # noqa: E402
from pipeline.export import Selection, prune_model  # noqa: E402
from pipeline.search.baselines import frequency  # noqa: E402
from pipeline.search.run import routing_usage  # noqa: E402
from pipeline.search.scoring import RoutingStats  # noqa: E402
from pipeline.skipping import calibrate_thresholds  # noqa: E402

VARIANTS = ("8", "8+skip", "6", "6+skip", "4", "4+skip")


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    """A random Mixtral-shaped causal LM directly on ``device`` in ``dtype``, in eval mode."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=args.experts_implementation)
    adapter = get_adapter(model.config)
    with torch.no_grad():
        for i in adapter.moe_layer_indices(model):
            adapter.router_weight(adapter.moe_block(adapter.decoder_layers(model)[i])).normal_(0.0, args.router_std)
    return model.eval()


def prune_by_frequency(model: Any, r: int, calib: torch.Tensor, device: torch.device) -> Any:
    """A copy of ``model`` keeping in each MoE layer the ``r`` experts most often routed to on ``calib``."""
    import copy

    adapter = get_adapter(model.config)
    usage = routing_usage(model, adapter, model.config, calib, batch_size=4, device=device)
    kept = {}
    for layer, counts in usage.items():
        stats = RoutingStats(counts=torch.tensor(counts), reap_sum=torch.zeros(len(counts), dtype=torch.float64), tokens=0)
        kept[layer] = frequency(stats, r)
    pruned = copy.deepcopy(model)
    prune_model(pruned, adapter, Selection.of(pruned, adapter, kept, "frequency"), progress=False)
    return pruned.eval()


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Device, versions and threads, for the record."""
    import transformers

    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--router-std", type=float, default=0.02, help="std of the random router weights (decisiveness)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-len", type=int, default=128)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--experts-implementation", default="eager", choices=["eager", "grouped_mm"],
                        help="transformers experts kernel of every variant (both leave skipped slots uncomputed)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}")

    gen = torch.Generator().manual_seed(args.seed + 1)
    calib = torch.randint(3, args.vocab, (args.calib_samples, args.calib_len), generator=gen)
    prompts = [torch.randint(3, args.vocab, (1, args.prompt_len), generator=gen) for _ in range(args.prompts)]
    base = build_model(args, device, dtype)
    models: dict[str, Any] = {"8": base}
    for r in sorted({int(n.split("+")[0]) for n in names} - {args.experts}, reverse=True):
        models[str(r)] = prune_by_frequency(base, r, calib, device)
    cases, thresholds = [], {}
    for name in names:
        key, skip = name.split("+")[0], name.endswith("+skip")
        model = models[key]
        if skip and key not in thresholds:
            thresholds[key] = calibrate_thresholds(model, get_adapter(model.config), calib, 0.5, 4, device, progress=False)
        cases.append(SpeedCase(name=name, model=model, skip=skip, thresholds=thresholds.get(key) if skip else None))
    env = environment(device, dtype)
    print(
        f"Mixtral-shaped random model: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"{args.experts} experts top-{args.top_k}, {args.experts_implementation} experts; {args.prompts} prompts x {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens, median of {args.repeats} interleaved repeats"
    )
    print(json.dumps(env))
    results = measure_speed(cases, prompts, args.new_tokens, args.repeats, args.warmup)
    ref = results["8"].tokens_per_s if "8" in results else None
    rows = []
    print(f"{'variant':8} {'tokens/s':>10} {'vs 8':>6} {'vs no-skip':>10} {'evals/tok':>9} {'skipped':>8} {'weights GB':>10}")
    for name in names:
        res = results[name]
        plain = results.get(name.split("+")[0])
        row = {
            "variant": name,
            "tokens_per_s": res.tokens_per_s,
            "runs": res.runs,
            "vs_8": res.tokens_per_s / ref if ref else None,
            "vs_no_skip": res.tokens_per_s / plain.tokens_per_s if name.endswith("+skip") and plain else None,
            "expert_evals_per_token": res.expert_evals_per_token,
            "skipped_fraction": res.skipped_fraction,
            "weight_bytes": weight_bytes(models[name.split("+")[0]]),
        }
        rows.append(row)
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(
            f"{name:8} {res.tokens_per_s:10.2f} {fmt(row['vs_8'], '6.2f')} {fmt(row['vs_no_skip'], '10.2f')} "
            f"{fmt(res.expert_evals_per_token, '9.3f')} {fmt(res.skipped_fraction, '8.3f')} {row['weight_bytes'] / 1e9:10.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "environment": env,
                                         "thresholds": thresholds, "results": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
