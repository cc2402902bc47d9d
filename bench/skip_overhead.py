"""What dynamic skipping costs and saves per decoded token on a small random Mixtral (default: the embedded model's sizes).

No downloaded weights: a Mixtral-shaped model (default hidden 128, expert intermediate 256, 4 layers, 8 experts,
top-2, 4 heads / 2 KV heads, vocabulary 4096, like params.yaml's ``model.embedded``) is built at random, its
router weights scaled by ``--router-std`` so routing is decisive, and skip thresholds are calibrated as the
skip_calibration stage does (median of ``w2 / w1`` per layer on random tokens). Two parts, both interleaved
in one process (every repeat times every case once, so load drift hits them alike):

* components, on one token of one MoE block (microseconds per call, median over repeats of a batch of calls):
  the experts module with two experts vs one expert and a skipped slot (the difference is what one skipped
  expert saves), the router alone, with an identity transform hook (the hook mechanism), with the skip hook
  as :func:`pipeline.skipping.enable` installs it, and with the rule as elementwise torch ops;
* decoding: greedy ``generate`` at batch size 1 of ``noskip``, ``skip`` (as :func:`pipeline.skipping.enable`
  installs it) and ``skip (torch top-2)`` (the same rule as elementwise torch ops in the hook), the order
  rotating between rounds; per round, each skip variant's speed-up over ``noskip`` by the wall clock and by
  the thread's CPU clock (which leaves out the time a loaded machine keeps the process waiting for a core).

    .venv/bin/python bench/skip_overhead.py --threads 1
    .venv/bin/python bench/skip_overhead.py --hidden 1024 --intermediate 3584 --heads 8 --kv-heads 2 --layers 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.models import get_adapter  # noqa: E402
from pipeline.skipping import _skip_top2, calibrate_thresholds, enable, skipper  # noqa: E402


def build_model(args: argparse.Namespace) -> Any:
    """A random Mixtral-shaped causal LM on the CPU in float32, eager experts, in eval mode."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts, num_experts_per_tok=2, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, experts_implementation="eager")
    adapter = get_adapter(model.config)
    with torch.no_grad():
        for i in adapter.moe_layer_indices(model):
            adapter.router_weight(adapter.moe_block(adapter.decoder_layers(model)[i])).normal_(0.0, args.router_std)
    return model.eval()


def spread(values: list[float]) -> dict[str, float]:
    """Median and quartiles."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2]}


def time_components(model: Any, beta: float, calls: int, repeats: int) -> dict[str, dict[str, float]]:
    """Microseconds per call of each component on one token of the first MoE block, interleaved."""
    adapter = get_adapter(model.config)
    block = adapter.moe_block(adapter.decoder_layers(model)[adapter.moe_layer_indices(model)[0]])
    router, experts = getattr(block, adapter.router_attr), getattr(block, adapter.experts_attr)
    n = adapter.block_num_experts(block)
    x = torch.randn(1, model.config.hidden_size)
    both = torch.tensor([[1, 5]])
    one = torch.tensor([[1, n]])
    weights = torch.tensor([[0.6, 0.4]])
    host, torch_ops = skipper(beta, n), (lambda w, i: _skip_top2(w, i, beta, n))  # noqa: E731

    def hooked(transform: Callable[..., Any]) -> Callable[[], float]:
        def run() -> float:
            handle = adapter.add_router_transform(block, transform)
            try:
                start = time.perf_counter()
                for _ in range(calls):
                    router(x)
                return time.perf_counter() - start
            finally:
                handle.remove()

        return run

    cases: dict[str, Callable[[], Any]] = {
        "experts, 2 experts": lambda: experts(x, both, weights),
        "experts, 1 expert + skipped slot": lambda: experts(x, one, weights),
        "router": lambda: router(x),
    }
    hooks = {
        "router + identity hook": lambda w, i: (w, i),
        "router + skip hook (NumPy top-2)": host,
        "router + skip hook (torch top-2)": torch_ops,
    }
    out: dict[str, list[float]] = {name: [] for name in [*cases, *hooks]}
    with torch.no_grad():
        for _ in range(repeats):
            for name, fn in cases.items():
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                out[name].append((time.perf_counter() - start) / calls * 1e6)
            for name, transform in hooks.items():
                out[name].append(hooked(transform)() / calls * 1e6)
    return {name: spread(v) for name, v in out.items()}


def time_decoding(
    model: Any, thresholds: dict[int, float], prompts: list[torch.Tensor], new_tokens: int, rounds: int
) -> dict[str, Any]:
    """Greedy decoding of every prompt per variant and round, variants interleaved (order rotating).

    Per round: wall and thread CPU time per new token, and each skip variant's speed-up over
    ``noskip`` in that round (the thread clock leaves out time the process waits for a core); also
    the ratio of the fastest rounds (the least disturbed by other load).
    """
    from transformers import GenerationConfig

    adapter = get_adapter(model.config)
    blocks = {i: adapter.moe_block(adapter.decoder_layers(model)[i]) for i in adapter.moe_layer_indices(model)}
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=2, pad_token_id=2)

    def torch_rule() -> list[Any]:
        return [adapter.add_router_transform(b, lambda w, i, beta=thresholds[layer], n=adapter.block_num_experts(b):
                                             _skip_top2(w, i, beta, n)) for layer, b in blocks.items()]

    variants: dict[str, Callable[[], list[Any]]] = {
        "noskip": list,
        "skip": lambda: [enable(model, thresholds, count=False)],
        "skip (torch top-2)": torch_rule,
    }
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in variants}
    names = list(variants)
    for r in range(rounds + 1):  # the first round is a warm-up
        for name in names[r % len(names):] + names[: r % len(names)]:
            handles = variants[name]()
            try:
                wall, cpu = time.perf_counter(), time.thread_time()
                for ids in prompts:
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            finally:
                for h in handles:
                    h.remove()
            if r:
                times[name]["wall"].append(wall / (new_tokens * len(prompts)))
                times[name]["cpu"].append(cpu / (new_tokens * len(prompts)))
    out: dict[str, Any] = {}
    for name, t in times.items():
        out[name] = {"ms_per_token": spread([v * 1e3 for v in t["wall"]]),
                     "cpu_ms_per_token": spread([v * 1e3 for v in t["cpu"]])}
        for clock in ("wall", "cpu"):
            out[name][f"speedup_{clock}"] = spread([b / v for b, v in zip(times["noskip"][clock], t[clock], strict=True)])
            out[name][f"speedup_{clock}_best"] = min(times["noskip"][clock]) / min(t[clock])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--router-std", type=float, default=0.3, help="std of the random router weights (decisiveness)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15, help="timed decoding rounds")
    parser.add_argument("--calls", type=int, default=200, help="calls per component timing")
    parser.add_argument("--component-repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    gen = torch.Generator().manual_seed(args.seed + 1)
    calib = torch.randint(3, args.vocab, (8, 128), generator=gen)
    prompts = [torch.randint(3, args.vocab, (1, args.prompt_len), generator=gen) for _ in range(args.prompts)]
    model = build_model(args)
    thresholds = calibrate_thresholds(model, get_adapter(model.config), calib, 0.5, 4, "cpu", progress=False)
    print(f"Mixtral-shaped random model: hidden {args.hidden}, expert intermediate {args.intermediate}, {args.layers} layers, "
          f"{args.experts} experts top-2, eager experts, float32, {torch.get_num_threads()} threads; thresholds {thresholds}")

    components = time_components(model, statistics.median(thresholds.values()), args.calls, args.component_repeats)
    print(f"{'component (one token)':36} {'us/call':>9} {'IQR':>17}")
    for name, s in components.items():
        print(f"{name:36} {s['median']:9.1f} {s['q1']:8.1f}-{s['q3']:<8.1f}")
    saved = components["experts, 2 experts"]["median"] - components["experts, 1 expert + skipped slot"]["median"]
    hook = components["router + skip hook (NumPy top-2)"]["median"] - components["router"]["median"]
    print(f"one skipped expert saves {saved:.1f} us; the skip hook costs {hook:.1f} us per MoE layer and token")

    decode = time_decoding(model, thresholds, prompts, args.new_tokens, args.repeats)
    per_token_ms = decode["noskip"]["ms_per_token"]["median"]
    print(f"decode, ms per token (median over rounds, wall / thread CPU): noskip {per_token_ms:.2f} / "
          f"{decode['noskip']['cpu_ms_per_token']['median']:.2f}")
    for name in ("skip", "skip (torch top-2)"):
        for clock in ("wall", "cpu"):
            r = decode[name][f"speedup_{clock}"]
            print(f"{name:20} tokens/s vs noskip, {clock:4}: median {r['median']:.3f} (IQR {r['q1']:.3f}-{r['q3']:.3f}), "
                  f"best round vs best round {decode[name][f'speedup_{clock}_best']:.3f}")
    print(f"one expert = {saved / (per_token_ms * 1e3):.1%} of a decoded token's time")
    if args.json:
        args.json.write_text(json.dumps({
            "settings": vars(args) | {"json": str(args.json)}, "thresholds": thresholds, "components_us": components,
            "decode": decode,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
