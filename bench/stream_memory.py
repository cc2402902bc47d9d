"""Peak GPU memory and RAM of activation caching + layerwise search do not grow with the number of layers.

Writes random-weight Mixtral-shaped checkpoints (safetensors, in the original per-expert layout
transformers converts on load) with ``--layers`` SHALLOW and DEEP decoder layers, then, each in a
fresh process, runs what the activations and search stages run: ``load_model(offload=...)``,
``cache_activations`` on ``--device`` and ``run_layerwise`` (enumeration, r = 4) over every MoE layer.
It prints the peak RSS, the peak CUDA memory (on a GPU) and the largest per-layer CUDA peak of each,
and the deep/shallow ratios. With ``--offload layers`` (the default) the weights are read from disk
one layer at a time, so a model larger than the RAM and the GPU goes through. Exit status 1 when a
ratio exceeds ``--limit``.

    .venv/bin/python bench/stream_memory.py --device cuda --dtype bfloat16 --layers 2 6            # GPU, Mixtral dims
    .venv/bin/python bench/stream_memory.py --hidden 512 --intermediate 1792 --heads 8 --kv-heads 2 \\
        --vocab 4096 --samples 8 --seq-len 256 --layers 2 6 --threads 2                           # CPU, scaled down
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def write_checkpoint(path: Path, args: argparse.Namespace, layers: int) -> None:
    """A random Mixtral-shaped checkpoint (built in RAM, without transformers' slow weight initialisation)."""
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    from pipeline.runtime import DTYPES

    dtype = DTYPES[args.save_dtype]
    config = MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=max(4096, args.seq_len), dtype=args.save_dtype,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("gate.weight"):
                p.normal_(0.0, 1.0 / args.hidden**0.5)
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(path, max_shard_size="2GB")


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Cache and search every layer of the checkpoint at ``args.child``; report peaks."""
    sys.path.insert(0, str(REPO))
    import torch
    from safetensors.torch import load_file

    from pipeline.activations import cache_activations
    from pipeline.models import get_adapter
    from pipeline.models.loading import load_model
    from pipeline.runtime import cuda_peak_bytes, resolve_device, resolve_dtype
    from pipeline.config import SearchParams
    from pipeline.search.run import run_layerwise

    from pipeline.evaluate.memory import PeakMemory

    if args.threads:
        torch.set_num_threads(args.threads)
    # ru_maxrss would include the parent's memory at fork time (kept across exec): reset the peak here
    mem = PeakMemory().__enter__()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = load_model(args.child, dtype=dtype, offload=args.offload)
    adapter = get_adapter(model.config)
    ids = torch.randint(3, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    layer_peaks: list[int] = []
    cuda_peak_bytes(device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        run = cache_activations(model, adapter, ids, work_dir=work, dtype=dtype, batch_size=args.batch_size,
                                device=device, progress=False)
        cache_peak = cuda_peak_bytes(device)
        cached = time.perf_counter()

        def on_layer(_result: Any, _resumed: bool) -> None:
            peak = cuda_peak_bytes(device)
            if peak is not None:
                layer_peaks.append(peak)

        results = run_layerwise(model, adapter, model.config, run.moe_layers, lambda i: load_file(run.files[i])["x"],
                                SearchParams(r=4, strategy="enumerate"), device=device, on_layer=on_layer)
    mem.__exit__(None, None, None)
    return {
        "layers": len(adapter.decoder_layers(model)),
        "peak_rss_bytes": mem.peak_rss_bytes,
        "rss_scope": mem.rss_scope,
        "peak_cuda_cache_bytes": cache_peak,
        "peak_cuda_search_layer_bytes": max(layer_peaks) if layer_peaks else None,
        "cache_seconds": cached - started,
        "search_seconds": time.perf_counter() - cached,
        "kept": [r.kept for r in results],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 6], metavar=("SHALLOW", "DEEP"))
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--offload", default="layers", choices=["layers", "none"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--limit", type=float, default=1.15, help="largest acceptable deep/shallow ratio of a peak")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = []
        for layers in args.layers:
            path = Path(tmp) / f"mixtral_{layers}"
            write_checkpoint(path, args, layers)
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            argv = list(sys.argv[1:])
            if "--json" in argv:
                del argv[argv.index("--json") : argv.index("--json") + 2]
            done = subprocess.run([sys.executable, __file__, *argv, "--child", str(path)], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.stderr.write(done.stderr[-4000:])
                return 2
            record = json.loads(done.stdout.strip().splitlines()[-1])
            record["checkpoint_bytes"] = size
            results.append(record)
    gib = 2**30
    fmt = lambda v: "-" if v is None else f"{v / gib:7.2f} GiB"  # noqa: E731
    print(f"Mixtral-shaped random model: hidden {args.hidden}, intermediate {args.intermediate}; "
          f"{args.samples} x {args.seq_len} tokens; offload {args.offload}; device {args.device}, dtype {args.dtype}")
    for r in results:
        print(f"{r['layers']:>3} layers ({fmt(r['checkpoint_bytes'])} on disk): peak RSS {fmt(r['peak_rss_bytes'])}, "
              f"peak CUDA caching {fmt(r['peak_cuda_cache_bytes'])}, per-layer search {fmt(r['peak_cuda_search_layer_bytes'])}; "
              f"cache {r['cache_seconds']:.1f} s, search {r['search_seconds']:.1f} s")
    ok = True
    for key in ("peak_rss_bytes", "peak_cuda_cache_bytes", "peak_cuda_search_layer_bytes"):
        a, b = results[0][key], results[1][key]
        if a and b:
            ratio = b / a
            ok &= ratio <= args.limit
            print(f"{key}: {args.layers[1]} / {args.layers[0]} layers = {ratio:.3f} (limit {args.limit})")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
