"""benchmark.device_map: models dispatched by accelerate (hooks on every module) still skip and decode exactly.

A CPU-only machine cannot spread a model over GPUs, but accelerate's dispatch is the same code with
``"cpu"`` and ``"disk"`` entries: layers mapped to ``"disk"`` keep meta weights that the hooks load
on every forward, which is what happens to CPU-offloaded layers of a model larger than its GPUs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import skipping
from pipeline.errors import PipelineError
from pipeline.evaluate.lmeval import vllm_available, vllm_model_args
from pipeline.config import BenchmarkParams, SpeedParams
from pipeline.evaluate.runner import BenchmarkSetup, build_variants, run_speed
from pipeline.evaluate.speed import _generate_all, input_device
from pipeline.models import get_adapter
from pipeline.models.loading import load_model
from tests.factory import save_tiny_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", "mixtral", layers=3)


def _thresholds(model) -> dict[int, float]:
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    return skipping.calibrate_thresholds(model, get_adapter(model.config), ids, 0.5, 2, CPU, progress=False)


def _decode(model, thresholds=None) -> tuple[torch.Tensor, dict | None]:
    prompt = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    handle = skipping.enable(model, thresholds, experts_implementation=None) if thresholds else None
    try:
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                 min_new_tokens=10, do_sample=False, pad_token_id=0)
        return out, handle.stats() if handle else None
    finally:
        if handle:
            handle.remove()


def test_disk_offloaded_layers_are_hooked_and_skipping_matches(checkpoint: Path, tmp_path: Path) -> None:
    plain = load_model(checkpoint, experts_implementation="eager")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    dispatched = load_model(
        checkpoint, device_map=device_map, offload_folder=tmp_path / "offload", experts_implementation="eager"
    )
    offloaded = dispatched.model.layers[1]
    assert hasattr(offloaded, "_hf_hook") and offloaded.mlp.gate.weight.is_meta  # weights come in per forward
    assert input_device(dispatched) == CPU
    thresholds = _thresholds(plain)
    ref_tokens, _ = _decode(plain)
    tokens, _ = _decode(dispatched)
    assert torch.equal(tokens, ref_tokens)
    ref_skip, ref_stats = _decode(plain, thresholds)
    skip_tokens, stats = _decode(dispatched, thresholds)
    assert torch.equal(skip_tokens, ref_skip)
    assert stats == ref_stats and 0 < stats["skipped_fraction"] < 1


def test_speed_phase_with_a_device_map(checkpoint: Path) -> None:
    """The benchmark's speed phase loads both variants with benchmark.device_map and counts skipped experts."""
    from tests.factory import tiny_tokenizer

    tiny_tokenizer().save_pretrained(checkpoint)
    thresholds = {str(k): v for k, v in _thresholds(load_model(checkpoint)).items()}
    variants = build_variants(["original", "original_skip"], checkpoint, None, {"original": thresholds})
    params = BenchmarkParams(
        tasks=["embedded"], device_map="cpu", speed=SpeedParams(prompts=2, new_tokens=4, repeats=1, warmup=0)
    )
    settings = BenchmarkSetup(params, CPU, torch.float32, trust_remote_code=False)
    speed, wbytes, _ = run_speed(variants, settings, ["def f(x):", "the quick brown fox"])
    assert speed["original"].expert_evals_per_token == pytest.approx(2.0)
    assert speed["original_skip"].expert_evals_per_token < 2.0
    assert wbytes["original"] == wbytes["original_skip"] > 0


def test_generate_all_puts_prompts_on_the_embeddings_device(checkpoint: Path) -> None:
    model = load_model(checkpoint, device_map={"": "cpu"})
    produced, seconds = _generate_all(model, [torch.tensor([[5, 6, 7]])], 3)
    assert produced == 3 and seconds > 0


def test_vllm_model_args_and_missing_vllm(tmp_path: Path) -> None:
    args = vllm_model_args(tmp_path, dtype="bfloat16", extra={"tensor_parallel_size": 2, "max_model_len": None})
    assert args == {"pretrained": str(tmp_path), "dtype": "bfloat16", "trust_remote_code": False, "tensor_parallel_size": 2}
    with pytest.raises(PipelineError, match=r"benchmark.vllm_args: dtype are set by the pipeline"):
        vllm_model_args(tmp_path, dtype="bfloat16", extra={"dtype": "float16"})
    if not vllm_available():
        from pipeline.evaluate.lmeval import evaluate_checkpoint_vllm

        with pytest.raises(PipelineError, match=r"vllm is not installed"):
            evaluate_checkpoint_vllm(tmp_path, None, dtype="bfloat16", batch_size=1)  # type: ignore[arg-type]
