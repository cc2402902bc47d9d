"""Beam search on fine-grained MoE layers: search time vs one dense pass vs REAP's scoring pass.

No downloaded weights: random-weight MoE blocks of two shapes (hidden and intermediate sizes scaled
to a CPU; expert counts, top-k and routing as in the real models):

* ``qwen3``: Qwen3-30B-A3B's routing: 128 experts, top-8, softmax renormalised over the top-8
  (transformers' ``Qwen3MoeSparseMoeBlock``);
* ``deepseek``: DeepSeek-V3's routing: 256 routed experts, top-8, sigmoid scores with a selection
  bias chosen inside the best 4 of 8 groups, renormalised, x 2.5, one shared expert
  (``DeepseekV3MoE``).

For ``r = n/2`` and ``r = n/4`` it runs, ``--repeats`` times in one process (medians and ranges):

* dense: one pass of every expert over every token (``adapter.expert_outputs`` per token chunk);
* REAP: REAP's scoring pass: the router, then each expert on the tokens routed to it, and
  ``mean w_j(x) ||E_j(x)||`` per expert (method.md §8);
* search: beam search of width ``--beam-width`` as the search stage runs it (``LazyScorer``:
  expert outputs on demand, children scored incrementally from their parent);
* reference: on the first ``--ref-tokens`` tokens, the search's losses of ``--ref-sets`` of the
  last level's sets (and the pick) against :func:`reference_losses` (the pruned block's own
  forward per set, method.md §2): largest relative difference, and whether the pick is the
  reference's best up to rounding (sets that drop experts no token uses tie exactly in the search
  and within ~1e-9 in the reference, so the strict argmin is reported too).

Ratios are per repeat (dense, REAP and search timed in turn): the median and its 95% percentile
bootstrap interval over repeats (``pipeline.evaluate.stats.speedup``; use 6 or more repeats).
Exit status 1 when the median search / dense > 3 or the reference disagrees.

    nice -n 10 .venv/bin/python bench/fine_grained_search.py --threads 1 --repeats 6 [--shapes qwen3 deepseek]
    python bench/fine_grained_search.py --device cuda --dtype bfloat16 --hidden 2048 --intermediate 768 ...   # a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.evaluate import stats  # noqa: E402
from pipeline.models import get_adapter  # noqa: E402
from pipeline.search.incremental import LazyScorer  # noqa: E402
from pipeline.search.reference import reference_losses  # noqa: E402
from pipeline.search.strategies import StrategyResult, beam_search  # noqa: E402


def build_block(shape: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """A random MoE block of ``shape`` and its config (router rows scaled so routing is decisive)."""
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.device(args.device):  # built and initialised where it runs (a real-size layer is tens of GB)
        return _random_block(shape, args, gen)


def _random_block(shape: str, args: argparse.Namespace, gen: torch.Generator) -> tuple[Any, Any]:
    if shape == "qwen3":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        config = Qwen3MoeConfig(
            hidden_size=args.hidden, moe_intermediate_size=args.intermediate, num_experts=128, num_experts_per_tok=8,
            norm_topk_prob=True, num_hidden_layers=1, experts_implementation=args.experts_implementation,
        )
        block = Qwen3MoeSparseMoeBlock(config).eval()
    else:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        config = DeepseekV3Config(
            hidden_size=args.hidden, moe_intermediate_size=args.intermediate, intermediate_size=args.intermediate,
            n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
            norm_topk_prob=True, routed_scaling_factor=2.5, num_hidden_layers=1, first_k_dense_replace=0,
            experts_implementation=args.experts_implementation,
        )
        block = DeepseekV3MoE(config).eval()
    adapter = get_adapter(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        adapter.router_weight(block).normal_(0.0, args.router_std / args.hidden**0.5, generator=gen)
        bias = adapter.choice_bias(block)
        if bias is not None:
            bias.normal_(0.0, 0.1, generator=gen)
    return block, config


def reap_pass(adapter: Any, block: Any, config: Any, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """REAP scores ``[n]``: router, then each expert on its routed tokens only."""
    n = adapter.block_num_experts(block)
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        xs = x[start : start + chunk]
        w, ids = adapter.route(block, adapter.router_logits(block, xs), config)
        for j in torch.unique(ids).tolist():
            tok, slot = (ids == j).nonzero(as_tuple=True)
            out = adapter.expert_outputs(block, xs.index_select(0, tok), [j])[:, 0]
            total[j] += float((w[tok, slot].double() * out.double().norm(dim=1)).sum())
            count[j] += tok.numel()
    return total / count.clamp_min(1)


def search(adapter: Any, block: Any, config: Any, x: torch.Tensor, r: int, args: argparse.Namespace) -> tuple[StrategyResult, LazyScorer]:
    """Beam search as the search stage runs it."""
    scorer = LazyScorer(adapter, block, config, x, tokens_per_batch=args.seq_len, token_chunk=args.token_chunk,
                        device=args.device)
    scorer.prepare()
    n = adapter.block_num_experts(block)
    result = beam_search(scorer.losses, n, r, args.beam_width, expand=scorer.children)
    return result, scorer


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Any) -> tuple[float, Any]:
    """Wall time of ``fn()`` (CUDA work finished before and after) and its result."""
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - start, out


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio(base: list[float], other: list[float]) -> dict[str, Any]:
    """Median per-repeat ``other / base`` with its 95% bootstrap interval (None under two repeats)."""
    sp = stats.speedup(base, other)
    assert sp is not None
    return {"median": sp.ratio, "interval": sp.interval, "repeats": sp.rounds}


def show(r: dict[str, Any]) -> str:
    low, high = r["interval"] if r["interval"] else (float("nan"), float("nan"))
    return f"{r['median']:.2f} [{low:.2f}, {high:.2f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["qwen3", "deepseek"], choices=["qwen3", "deepseek"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=128, help="per expert")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per loss batch")
    parser.add_argument("--token-chunk", type=int, default=8192, help="search.token_chunk")
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--router-std", type=float, default=2.0, help="std of the router logits")
    parser.add_argument("--ref-tokens", type=int, default=512)
    parser.add_argument("--ref-sets", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--experts-implementation", default="eager", choices=["eager", "grouped_mm", "batched_mm"],
                        help="transformers' experts kernel (eager: a loop over experts; its default where supported: grouped_mm)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights and calibration tokens (the search's sums are float64 on any dtype)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(args.seed + 1)).to(args.device, dtype)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"hidden {args.hidden}, intermediate {args.intermediate}, {args.tokens} tokens (loss batches of {args.seq_len}), "
          f"beam width {args.beam_width}, {args.experts_implementation} experts, {args.dtype} on {where}, {args.repeats} repeats; torch {torch.__version__}", flush=True)
    records: list[dict[str, Any]] = []
    ok = True
    for shape in args.shapes:
        block, config = build_block(shape, args)
        block = block.to(args.device, dtype)
        adapter = get_adapter(config)
        n = adapter.block_num_experts(block)

        def dense(block: Any = block, adapter: Any = adapter) -> None:
            for start in range(0, x.shape[0], args.token_chunk):
                adapter.expert_outputs(block, x[start : start + args.token_chunk])

        dense()  # warm-up
        for r in (n // 2, n // 4):
            t_dense, t_reap, t_search = [], [], []
            result, scorer = None, None
            for _ in range(args.repeats):
                td, _ = timed(dense)
                tr, _ = timed(lambda: reap_pass(adapter, block, config, x, args.token_chunk))
                ts, (result, scorer) = timed(lambda: search(adapter, block, config, x, r, args))
                t_dense.append(td), t_reap.append(tr), t_search.append(ts)
            assert result is not None and scorer is not None
            evals = scorer.expert_evals / (n * x.shape[0])
            # Reference: the search's losses on a token subset against the pruned blocks' own forward.
            sub = x[: args.ref_tokens]
            sub_result, sub_scorer = search(adapter, block, config, sub, r, args)
            order = sub_result.losses.argsort()
            pick = order[: args.ref_sets].tolist()
            sets = sub_result.candidates[pick]
            ref = reference_losses(adapter, block, config, sub, sets, tokens_per_batch=args.seq_len)
            ours = sub_result.losses[pick]
            gap = float(((ours - ref).abs() / ref.abs()).max())
            strict = int(ref.argmin()) == 0
            agree = bool(ref[0] <= ref.min() * (1 + 1e-7))
            ties = int((ours == ours[0]).sum())
            rec = {
                "shape": shape, "n": n, "r": r, "candidates": result.evaluated,
                "dense_s": summary(t_dense), "reap_s": summary(t_reap), "search_s": summary(t_search),
                "search_vs_dense": ratio(t_dense, t_search), "search_vs_reap": ratio(t_reap, t_search),
                "expert_evals_vs_dense": evals, "reference_sets": len(pick), "reference_max_rel_gap": gap,
                "reference_pick_is_best": agree, "reference_argmin_agrees": strict, "sets_tied_with_pick": ties,
            }
            records.append(rec)
            med = rec["search_vs_dense"]
            print(f"{shape:8s} n={n} r={r:3d}: {result.evaluated} sets; dense {rec['dense_s']['median']:.2f} s, "
                  f"REAP {rec['reap_s']['median']:.2f} s, search {rec['search_s']['median']:.2f} s; "
                  f"search/dense {show(med)}, search/REAP {show(rec['search_vs_reap'])}; "
                  f"expert outputs computed {evals:.2f} x dense; reference on {len(pick)} sets x {sub.shape[0]} "
                  f"tokens: max rel gap {gap:.1e}, pick is the best {agree} (strict argmin {strict}, "
                  f"{ties} sets tied with it in the search)", flush=True)
            ok &= med["median"] <= 3.0 and agree and gap < (1e-4 if args.dtype == "float32" else 1e-2)  # bf16/fp16: the block's own forward rounds
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "results": records}, indent=2))
    print("PASS" if ok else "FAIL", "search <= 3x dense and the reference agrees")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
