"""The CUDA path of every stage on tiny models: same code as on the CPU, same results (to float tolerance).

CI has no GPU: every test here is skipped there with the reason below. On a GPU machine run
``.venv/bin/python -m pytest -m gpu`` (docs/benchmarks.md lists the GPU checks).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline import skipping
from pipeline.activations import cache_activations
from pipeline.export import Selection, export_pruned
from pipeline.models import get_adapter
from pipeline.models.loading import load_model
from pipeline.runtime import cuda_peak_bytes, resolve_dtype
from pipeline.config import SearchParams
from pipeline.search.run import run_layerwise
from pipeline.streaming import stream_layers
from tests.factory import tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here; run pytest -m gpu on a GPU machine)"),
]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _ids(vocab: int = 320, n: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _moe_inputs(model, device: torch.device, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    adapter = get_adapter(model.config)
    return {
        s.index: torch.cat(s.moe_input).float().cpu()
        for s in stream_layers(model, adapter, ids, batch_size=2, device=device, progress=False)
        if s.block is not None
    }


def test_auto_dtype_is_bfloat16_on_cuda() -> None:
    assert resolve_dtype("auto", CUDA) in (torch.bfloat16, torch.float16)


def test_skip_rule_on_cuda_equals_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4096, 8, generator=g) * 2, dim=-1)
    w, idx = torch.topk(probs, 2, dim=-1)
    for beta in (0.2, 0.5, 0.9, math.inf):
        w_cpu, idx_cpu = skipping.skip_routing(w, idx, beta, sentinel=8)
        w_gpu, idx_gpu = skipping.skip_routing(w.to(CUDA), idx.to(CUDA), beta, sentinel=8)
        assert torch.equal(idx_gpu.cpu(), idx_cpu)
        torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=1e-6, atol=0)


def test_skipping_on_cuda_skips_and_matches_cpu() -> None:
    model = tiny_model()
    ids = _ids()
    adapter = get_adapter(model.config)
    cpu_thresholds = skipping.calibrate_thresholds(model, adapter, ids, 0.5, 2, CPU, progress=False)
    gpu_model = tiny_model().to(CUDA)
    thresholds = skipping.calibrate_thresholds(gpu_model, adapter, ids, 0.5, 2, CUDA, progress=False)
    assert thresholds == pytest.approx(cpu_thresholds, rel=1e-4)
    with torch.no_grad(), skipping.enable(model, cpu_thresholds):
        ref = model(input_ids=ids).logits
    for implementation in ("eager", "grouped_mm"):
        gpu_model.set_experts_implementation(implementation)
        with torch.no_grad(), skipping.enable(gpu_model, cpu_thresholds, experts_implementation=None) as handle:
            assert gpu_model.config._experts_implementation == implementation
            out = gpu_model(input_ids=ids.to(CUDA)).logits
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)
        stats = handle.stats()
        assert 1.0 < stats["evals_per_token"] < 2.0 and abs(stats["second_expert_skipped_fraction"] - 0.5) < 0.1


def test_offloaded_layers_stream_onto_cuda(tmp_path: Path) -> None:
    """Weights read from the checkpoint straight onto the GPU; MoE inputs as on the CPU."""
    path = tmp_path / "m"
    tiny_model("qwen3_moe").save_pretrained(path)
    ids = _ids()
    reference = _moe_inputs(load_model(path), CPU, ids)
    lazy = load_model(path, offload="layers")
    streamed = _moe_inputs(lazy, CUDA, ids)
    assert sorted(streamed) == sorted(reference)
    for i, x in streamed.items():
        torch.testing.assert_close(x, reference[i], rtol=1e-4, atol=1e-4)
    assert all(p.is_meta for layer in get_adapter(lazy.config).decoder_layers(lazy) for p in layer.parameters())


def _big_layers_checkpoint(path: Path, layers: int) -> Path:
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=320, hidden_size=256, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("offload", ["layers", "none"])
def test_peak_gpu_memory_of_activations_and_search_does_not_grow_with_depth(tmp_path: Path, offload: str) -> None:
    peaks = {}
    for layers in (2, 6):
        path = _big_layers_checkpoint(tmp_path / f"l{layers}", layers)
        model = load_model(path, offload=offload)
        adapter = get_adapter(model.config)
        ids = _ids(n=4, length=32)
        torch.cuda.empty_cache()
        cuda_peak_bytes(CUDA)
        run = cache_activations(model, adapter, ids, work_dir=tmp_path / f"w{layers}{offload}", dtype=torch.float32,
                                batch_size=2, device=CUDA, progress=False)
        from safetensors.torch import load_file

        load = lambda i: load_file(run.files[i])["x"]  # noqa: E731
        run_layerwise(model, adapter, model.config, run.moe_layers, load, SearchParams(r=4), device=CUDA)
        peaks[layers] = cuda_peak_bytes(CUDA)
    layer_bytes = 8 * 3 * 256 * 2048 * 4
    assert peaks[6] - peaks[2] < 0.5 * layer_bytes, peaks


def test_search_on_cuda_matches_cpu_and_bf16_verifies() -> None:
    model = tiny_model(layers=2)
    adapter = get_adapter(model.config)
    ids = _ids(n=6, length=24)
    inputs = _moe_inputs(model, CPU, ids)
    settings = SearchParams(r=4, strategy="enumerate", baselines=["frequency", "reap"])
    cpu = run_layerwise(model, adapter, model.config, sorted(inputs), inputs.__getitem__, settings, device=CPU)
    gpu = run_layerwise(model, adapter, model.config, sorted(inputs), inputs.__getitem__, settings, device=CUDA)
    assert [r.kept for r in gpu] == [r.kept for r in cpu]
    for a, b in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(a.losses, b.losses, rtol=1e-5, atol=1e-8)
    bf16 = tiny_model(layers=2, dtype=torch.bfloat16)
    results = run_layerwise(bf16, adapter, bf16.config, sorted(inputs), inputs.__getitem__, settings, device=CUDA)
    assert all(r.verified_loss is not None and len(r.kept) == 4 for r in results)


def test_export_checks_on_cuda(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ids = _ids()
    selection = Selection.from_dict(
        {"r": 6, "num_experts": 8, "top_k": 2, "layers": [{"layer": 0, "kept": [0, 1, 2, 4, 5, 7]}, {"layer": 1, "kept": [1, 2, 3, 4, 5, 6]}]}
    )
    outs = {}
    for device in (CPU, CUDA):
        model = tiny_model()
        inputs = _moe_inputs(model, CPU, ids)
        report = export_pruned(model, get_adapter(model.config), selection, tmp_path / device.type, inputs=inputs.__getitem__,
                               device=device, progress=False)
        assert report.checks and max(c.rel_error for c in report.checks) < 1e-4
        outs[device.type] = load_file(tmp_path / device.type / "model.safetensors")
    assert all(torch.equal(outs["cuda"][k], outs["cpu"][k]) for k in outs["cpu"])


def test_speed_and_device_map_auto_on_cuda(tmp_path: Path) -> None:
    from pipeline.evaluate.speed import SpeedCase, measure_speed

    path = tmp_path / "m"
    tiny_model().save_pretrained(path)
    model = load_model(path, dtype=torch.bfloat16, device=CUDA, experts_implementation="eager")
    mapped = load_model(path, dtype=torch.bfloat16, device_map="auto", experts_implementation="eager")
    thresholds = skipping.calibrate_thresholds(model, get_adapter(model.config), _ids(), 0.5, 2, CUDA, progress=False)
    prompts = [_ids(n=1, length=8, seed=s) for s in range(2)]
    res = measure_speed(
        [SpeedCase("plain", model), SpeedCase("skip", model, skip=True, thresholds=thresholds),
         SpeedCase("mapped_skip", mapped, skip=True, thresholds=thresholds)],
        prompts, new_tokens=6, repeats=1, warmup=0,
    )
    assert res["plain"].expert_evals_per_token == pytest.approx(2.0)
    assert res["skip"].expert_evals_per_token < 2.0
    assert res["mapped_skip"].expert_evals_per_token == pytest.approx(res["skip"].expert_evals_per_token)
