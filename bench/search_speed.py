"""Speed of the enumeration search: fast Gram scoring vs the per-candidate reference vs one dense pass.

On one MoE layer's cached input (a tiny Mixtral of the embedded model's shape, 8 experts, top-2,
64 x 128 calibration tokens by default; or the pipeline's own model and activation cache with
``--from-outputs``), keeping 4 of 8 experts (70 candidates), it times:

* fast: :meth:`LayerScorer.score_subsets` (one expert pass per token chunk, Gram matrices, every
  candidate scored from them) plus the argmin;
* reference: :func:`reference_losses`, the loss as method.md §2 defines it: for each candidate the
  block is pruned with the adapter and the pruned block's own forward runs on each calibration batch
  (``--loss-batch-size`` sequences), ``sum_b ||Z_b - Z_hat_b||_F``;
* reference, chunked: the same per-candidate pruning, with one forward per candidate over all tokens
  and the per-batch norms taken afterwards (a lower bound for any per-candidate method);
* dense: one pass of every expert over every token (``adapter.expert_outputs``).

It checks that the fast and reference picks are identical, fast >= 20x faster than the reference and
fast <= 3x one dense pass, and exits 1 when a check fails. Timings are the best of ``--repeats``.

    .venv/bin/python bench/search_speed.py [--samples 64 --seq-len 128 --threads 2 --device cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.io import load_tensors, save_tensors  # noqa: E402
from pipeline.models import get_adapter  # noqa: E402
from pipeline.search.reference import reference_losses  # noqa: E402
from pipeline.search.scoring import LayerScorer  # noqa: E402
from pipeline.search.strategies import enumerate_all  # noqa: E402
from pipeline.streaming import stream_layers  # noqa: E402


def best_time(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    """Smallest wall time of ``repeats`` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def synthetic_layer(args: argparse.Namespace, device: torch.device, folder: Path) -> tuple[Any, Any, torch.Tensor]:
    """A tiny random Mixtral of the embedded model's shape and its first layer's cached MoE input."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(args.seed)
    config = MixtralConfig(
        vocab_size=4096, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=max(512, args.seq_len),
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.normal_(0.0, 0.5)  # decisive routing, like a trained router
    ids = torch.randint(0, config.vocab_size, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    adapter = get_adapter(config)
    step = next(iter(stream_layers(model, adapter, ids, batch_size=8, device=device, progress=False)))
    x = step.moe_tokens().reshape(args.samples, args.seq_len, -1)
    save_tensors(folder / "layer_000.safetensors", {"x": x})
    return model, adapter, load_tensors(folder / "layer_000.safetensors")["x"]


def pipeline_layer(args: argparse.Namespace) -> tuple[Any, Any, torch.Tensor]:
    """The pipeline's model (outputs/model) and the activation cache of one of its MoE layers."""
    from pipeline.activations import ActivationCache
    from pipeline.models.loading import ModelManifest, load_model

    manifest = ModelManifest.load(REPO / "outputs/model/manifest.json")
    cache = ActivationCache(REPO / "outputs/activations", manifest.fingerprint)
    model = load_model(REPO / manifest.path if not Path(manifest.path).is_absolute() else manifest.path)
    return model, get_adapter(model.config), cache.load(cache.layers[args.layer])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--loss-batch-size", type=int, default=1, help="sequences per loss batch (search.loss_batch_size)")
    parser.add_argument("--token-chunk", type=int, default=8192, help="tokens per expert pass (search.token_chunk)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer", type=int, default=0, help="with --from-outputs: which MoE layer")
    parser.add_argument("--from-outputs", action="store_true", help="use outputs/model and outputs/activations")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        model, adapter, x = pipeline_layer(args) if args.from_outputs else synthetic_layer(args, device, Path(tmp))
    layer = adapter.moe_layer_indices(model)[args.layer if args.from_outputs else 0]
    block = adapter.moe_block(adapter.decoder_layers(model)[layer]).to(device)
    config = model.config
    n, k = adapter.block_num_experts(block), adapter.top_k(config)
    samples, seq_len = x.shape[0], x.shape[1]
    tokens_per_batch = args.loss_batch_size * seq_len
    flat = x.reshape(-1, x.shape[-1])
    dtype = next(block.parameters()).dtype
    print(f"layer {layer}: {n} experts, top-{k}, keep {args.r}; {samples} x {seq_len} = {flat.shape[0]} tokens, "
          f"hidden {x.shape[-1]}; loss batch {tokens_per_batch} tokens; device {device}, {torch.get_num_threads()} threads")

    def dense() -> None:
        for start in range(0, flat.shape[0], args.token_chunk):
            adapter.expert_outputs(block, flat[start : start + args.token_chunk].to(device, dtype))

    def fast() -> tuple[list[int], torch.Tensor, torch.Tensor]:
        scorer = LayerScorer(adapter, block, config, x, tokens_per_batch=tokens_per_batch, token_chunk=args.token_chunk, device=device)
        kept, losses = scorer.score_subsets(args.r)
        scorer.close()
        return enumerate_all(kept, losses).kept, kept, losses

    dense()  # warm-up (allocator, thread pool)
    t_dense, _ = best_time(dense, args.repeats, device)
    t_fast, (pick_fast, kept, losses) = best_time(fast, args.repeats, device)
    t_ref, ref = best_time(
        lambda: reference_losses(adapter, block, config, x, kept, tokens_per_batch=tokens_per_batch, layer_idx=layer),
        max(1, args.repeats // 3), device,
    )
    t_chunked, chunked = best_time(lambda: chunked_reference(adapter, block, config, flat, kept, tokens_per_batch, layer, device), 1, device)
    pick_ref = enumerate_all(kept, ref).kept
    pick_chunked = enumerate_all(kept, chunked).kept
    gap = float(((losses - ref).abs() / ref.abs().clamp_min(1e-30)).max())

    print(f"candidates              {kept.shape[0]}")
    print(f"dense expert pass       {t_dense * 1e3:10.1f} ms")
    print(f"fast search             {t_fast * 1e3:10.1f} ms   = {t_fast / t_dense:5.2f} x dense   pick {pick_fast}")
    print(f"reference (per batch)   {t_ref * 1e3:10.1f} ms   = {t_ref / t_fast:6.1f} x fast     pick {pick_ref}")
    print(f"reference (chunked)     {t_chunked * 1e3:10.1f} ms   = {t_chunked / t_fast:6.1f} x fast     pick {pick_chunked}")
    print(f"max relative loss difference fast vs reference: {gap:.2e}")
    checks = {
        "identical picks": pick_fast == pick_ref == pick_chunked,
        "fast >= 20x faster than the reference": t_ref >= 20 * t_fast,
        "fast <= 3x one dense pass": t_fast <= 3 * t_dense,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


def chunked_reference(
    adapter: Any, block: Any, config: Any, flat: torch.Tensor, kept: torch.Tensor, tokens_per_batch: int, layer: int, device: torch.device
) -> torch.Tensor:
    """The reference loss with one pruned-block forward per candidate over all tokens."""
    dtype = next(block.parameters()).dtype
    tokens = flat.to(device, dtype)
    full = adapter.block_output(block, tokens).double()
    pruned_config = adapter.pruned_config(config, kept.shape[1])
    out = torch.empty(kept.shape[0], dtype=torch.float64)
    for c, row in enumerate(kept.tolist()):
        err = full - adapter.block_output(adapter.prune_block(block, row, pruned_config, layer), tokens).double()
        per_batch = torch.stack([err[s : s + tokens_per_batch].norm() for s in range(0, err.shape[0], tokens_per_batch)])
        out[c] = float(per_batch.sum())
    return out


if __name__ == "__main__":
    sys.exit(main())
