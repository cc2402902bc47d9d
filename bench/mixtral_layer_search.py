"""Search time of one Mixtral-size MoE layer: our fast scoring vs one dense pass vs the per-candidate reference.

No downloaded weights: a Mixtral-8x7B-dimension sparse MoE block (hidden 4096, intermediate 14336,
8 experts, top-2; transformers' ``MixtralSparseMoeBlock``) with random weights (router rows scaled so
routing is decisive, as in a trained model) and ``--tokens`` random calibration inputs (262,144 =
128 x 2048, the paper's calibration size), kept on the CPU in float32 as the activation cache
stores them. Keeping ``--r`` = 4 of 8 experts means 70 candidates. Timed (best of ``--repeats``):

* dense: one pass of every expert over every token (``adapter.expert_outputs`` per token chunk);
* search: the enumeration the search stage runs (``LayerScorer.score_subsets`` + argmin);
* search_layer: the search stage's whole per-layer call (``pipeline.search.run.search_layer``:
  enumeration, frequency/random/REAP baselines and the ``verify`` recomputation of the winner);
* reference: method.md §2 as the paper's code computes it, one pruned-block forward per candidate
  per loss batch (``reference_losses``), on the first ``--ref-tokens`` tokens, extrapolated
  linearly to all tokens; the fast scorer is run on the same subset and must pick the same set.

Prints the ratios and, on CUDA, the peak GPU memory of the search. Exit status 1 when the picks
differ or the search takes more than 3x one dense pass (and, at full size on CUDA, more than 5 s).

    .venv/bin/python bench/mixtral_layer_search.py --device cuda --dtype bfloat16            # GPU, full size
    .venv/bin/python bench/mixtral_layer_search.py --hidden 512 --intermediate 1792 \\
        --tokens 16384 --ref-tokens 1024 --threads 2                                         # CPU, scaled down
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.models import get_adapter  # noqa: E402
from pipeline.runtime import cuda_peak_bytes, resolve_device, resolve_dtype  # noqa: E402
from pipeline.search.reference import reference_losses  # noqa: E402
from pipeline.config import SearchParams  # noqa: E402
from pipeline.search.run import search_layer  # noqa: E402
from pipeline.search.scoring import LayerScorer  # noqa: E402
from pipeline.search.strategies import enumerate_all  # noqa: E402

FULL = {"hidden": 4096, "intermediate": 14336, "experts": 8, "top_k": 2, "tokens": 262_144}


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    """Smallest wall time of ``repeats`` calls (synchronised on CUDA), and the last result."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def build_block(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """A random Mixtral sparse MoE block on ``device`` and its config."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_local_experts=args.experts,
        num_experts_per_tok=args.top_k, num_hidden_layers=1, experts_implementation="eager",
    )
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.device(device):
        block = MixtralSparseMoeBlock(config).to(dtype).eval()
    with torch.no_grad():
        for p in block.experts.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        block.gate.weight.normal_(0.0, args.router_std / args.hidden**0.5, generator=gen)
    return block, config


def calibration_inputs(args: argparse.Namespace) -> torch.Tensor:
    """``[tokens, hidden]`` float32 on the CPU: post-norm hidden states are about unit scale."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    return torch.randn(args.tokens, args.hidden, generator=gen)


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=FULL["hidden"])
    parser.add_argument("--intermediate", type=int, default=FULL["intermediate"])
    parser.add_argument("--experts", type=int, default=FULL["experts"])
    parser.add_argument("--top-k", type=int, default=FULL["top_k"])
    parser.add_argument("--tokens", type=int, default=FULL["tokens"], help="calibration tokens (paper: 128 x 2048)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per loss batch (search.loss_batch_size = 1)")
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--ref-tokens", type=int, default=8192, help="tokens the per-candidate reference runs on")
    parser.add_argument("--token-chunk", type=int, default=8192, help="search.token_chunk")
    parser.add_argument("--router-std", type=float, default=1.0, help="std of the router logits (1: top-2 weight ratios like Mixtral's)")
    parser.add_argument("--repeats", type=int, default=3)
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
    seq_len = min(args.seq_len, args.tokens)
    ref_tokens = min(args.ref_tokens, args.tokens)

    block, config = build_block(args, device, dtype)
    adapter = get_adapter(config)
    x = calibration_inputs(args)
    env = environment(device, dtype)
    print(
        f"MoE layer: hidden {args.hidden}, intermediate {args.intermediate}, {args.experts} experts top-{args.top_k}, "
        f"keep {args.r}; {args.tokens:,} tokens (loss batches of {seq_len}); reference on {ref_tokens:,} tokens"
    )
    print(json.dumps(env))

    def dense() -> None:
        for start in range(0, x.shape[0], args.token_chunk):
            adapter.expert_outputs(block, x[start : start + args.token_chunk].to(device, dtype))

    def fast(tokens: torch.Tensor) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        scorer = LayerScorer(adapter, block, config, tokens, tokens_per_batch=seq_len, token_chunk=args.token_chunk, device=device)
        kept, losses = scorer.score_subsets(args.r)
        scorer.close()
        return enumerate_all(kept, losses).kept, kept, losses

    settings = SearchParams(r=args.r, strategy="enumerate", token_chunk=args.token_chunk)

    dense()  # warm-up: kernels, allocator, thread pool
    t_dense, _ = timed(dense, args.repeats, device)
    cuda_peak_bytes(device)
    t_fast, (pick, kept, losses) = timed(lambda: fast(x), args.repeats, device)
    peak_search = cuda_peak_bytes(device)
    t_layer, layer_result = timed(
        lambda: search_layer(adapter, block, config, x, 0, settings, seq_len=seq_len, device=device), 1, device
    )
    peak_layer = cuda_peak_bytes(device)
    sub = x[:ref_tokens]
    t_ref, ref = timed(lambda: reference_losses(adapter, block, config, sub, kept, tokens_per_batch=seq_len), 1, device)
    pick_sub_fast, _, losses_sub = fast(sub)
    pick_sub_ref = enumerate_all(kept, ref).kept
    t_ref_all = t_ref * args.tokens / ref_tokens
    gap = float(((losses_sub - ref).abs() / ref.abs().clamp_min(1e-30)).max())

    mb = lambda v: "-" if v is None else f"{v / 2**20:,.0f} MiB"  # noqa: E731
    print(f"candidates                           {kept.shape[0]}")
    print(f"dense expert pass                    {t_dense:9.3f} s")
    print(f"search (score_subsets + argmin)      {t_fast:9.3f} s = {t_fast / t_dense:5.2f} x dense   pick {pick}   peak GPU {mb(peak_search)}")
    print(f"search_layer (+ baselines, verify)   {t_layer:9.3f} s = {t_layer / t_dense:5.2f} x dense   pick {layer_result.kept}   peak GPU {mb(peak_layer)}")
    print(f"reference on {ref_tokens:>9,} tokens        {t_ref:9.3f} s")
    print(f"reference extrapolated to all tokens {t_ref_all:9.3f} s = {t_ref_all / t_fast:7.1f} x search")
    print(f"picks on the reference subset: fast {pick_sub_fast}, reference {pick_sub_ref}; max relative loss gap {gap:.2e}")
    full_size = all(getattr(args, k) == v for k, v in FULL.items())
    checks = {
        "identical picks (fast vs reference, same tokens)": pick_sub_fast == pick_sub_ref,
        "search_layer picks the enumeration's set": layer_result.kept == pick,
        "search <= 3x one dense pass": t_fast <= 3 * t_dense,
    }
    if full_size and device.type == "cuda":
        checks["search <= 5 s (Mixtral size)"] = t_fast <= 5.0
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        record = {
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "environment": env,
            "seconds": {"dense": t_dense, "search": t_fast, "search_layer": t_layer, "reference_subset": t_ref,
                        "reference_extrapolated": t_ref_all},
            "ratios": {"search_vs_dense": t_fast / t_dense, "reference_vs_search": t_ref_all / t_fast},
            "peak_cuda_bytes": {"search": peak_search, "search_layer": peak_layer},
            "picks": {"search": pick, "search_layer": layer_result.kept, "subset_fast": pick_sub_fast,
                      "subset_reference": pick_sub_ref},
            "max_relative_loss_gap": gap,
            "checks": checks,
        }
        args.json.write_text(json.dumps(record, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
