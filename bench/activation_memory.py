"""Peak memory of the activation cache does not grow with the model's depth.

Caches the MoE inputs of a tiny random Mixtral with 2 and with 8 decoder layers on a large token
count, each configuration in a fresh subprocess, and prints each run's peak RSS (ru_maxrss) and
the ratio 8-layer / 2-layer. The per-layer cache (tokens x hidden x 4 bytes) is made large next to
the weights, so a loop that kept every layer's hidden states would show up as a ratio near 4.
Exits 1 when the ratio exceeds the limit (default 1.2).

    .venv/bin/python bench/activation_memory.py [--samples 256 --seq-len 256 --hidden 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(layers: int, samples: int, seq_len: int, hidden: int, batch_size: int) -> dict[str, float]:
    """Run one cache in this process and report its peak RSS."""
    sys.path.insert(0, str(REPO))
    import torch

    from pipeline.activations import cache_activations
    from pipeline.models import get_adapter
    from tests.factory import tiny_model

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    model = tiny_model("mixtral", layers=layers, hidden=hidden)
    ids = torch.randint(0, model.config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory() as work:
        run = cache_activations(
            model, get_adapter(model.config), ids, work_dir=work, dtype=torch.float32, batch_size=batch_size,
            progress=False,
        )
        shard = run.files[run.moe_layers[0]].stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "layers": layers,
        "peak_rss_bytes": peak,
        "rss_before_cache_bytes": before,
        "shard_bytes": shard,
        "tokens_per_s": run.tokens_per_s,
    }


def measure(layers: int, args: argparse.Namespace) -> dict[str, float]:
    """Run :func:`child` in a fresh interpreter."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(layers),
        "--samples",
        str(args.samples),
        "--seq-len",
        str(args.seq_len),
        "--hidden",
        str(args.hidden),
        "--batch-size",
        str(args.batch_size),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"child with {layers} layers failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 8], metavar=("SHALLOW", "DEEP"))
    parser.add_argument("--limit", type=float, default=1.2, help="largest acceptable peak-RSS ratio deep/shallow")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.samples, args.seq_len, args.hidden, args.batch_size)))
        return
    mib = 1024**2
    tokens = args.samples * args.seq_len
    print(f"tiny random Mixtral, hidden {args.hidden}, {args.samples} x {args.seq_len} = {tokens:,} tokens, micro-batch {args.batch_size}")
    results = [measure(n, args) for n in args.layers]
    for r in results:
        print(
            f"{r['layers']:>2} layers: peak RSS {r['peak_rss_bytes'] / mib:8.1f} MiB "
            f"(before caching {r['rss_before_cache_bytes'] / mib:7.1f} MiB; one layer's cache {r['shard_bytes'] / mib:6.1f} MiB; "
            f"{r['tokens_per_s']:,.0f} layer-tokens/s)"
        )
    ratio = results[1]["peak_rss_bytes"] / results[0]["peak_rss_bytes"]
    verdict = "ok" if ratio <= args.limit else "FAIL"
    print(f"peak RSS ratio {args.layers[1]} / {args.layers[0]} layers: {ratio:.3f} (limit {args.limit}) {verdict}")
    if ratio > args.limit:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
