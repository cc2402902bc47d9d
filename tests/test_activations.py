"""Activation cache: equality with a full forward pass, resume, the reader's checks, progressive mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from pipeline.activations import (
    ActivationCache,
    cache_activations,
    commit_cache,
    shard_name,
    write_chunked_safetensors,
)
from pipeline.errors import PipelineError
from pipeline.io import sha256_file
from pipeline.models import get_adapter
from tests.factory import tiny_model

N, L, BATCH = 6, 12, 4  # two micro-batches of unequal size


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_model("mixtral", layers=3, seed=1)


@pytest.fixture(scope="module")
def input_ids(model: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (N, L), generator=g)


def run_cache(model: Any, ids: torch.Tensor, work: Path, **kw: Any) -> Any:
    kw.setdefault("batch_size", BATCH)
    kw.setdefault("dtype", torch.float32)
    return cache_activations(model, get_adapter(model.config), ids, work_dir=work, progress=False, **kw)


@torch.no_grad()
def full_forward_moe_inputs(model: Any, ids: torch.Tensor) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """One full forward pass: each layer's post-attention-norm output (hooked) and the hidden states."""
    captured: list[torch.Tensor] = []
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
        for layer in model.model.layers
    ]
    try:
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return captured, out.hidden_states


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "layers").glob("*.safetensors"))}


def test_cached_inputs_equal_a_full_forward_pass(model: Any, input_ids: torch.Tensor, tmp_path: Path) -> None:
    run = run_cache(model, input_ids, tmp_path)
    reference, hidden_states = full_forward_moe_inputs(model, input_ids)
    assert run.moe_layers == [0, 1, 2]
    for i in run.moe_layers:
        x = load_file(str(run.files[i]))["x"]
        assert x.shape == (N, L, model.config.hidden_size) and x.dtype == torch.float32
        torch.testing.assert_close(x, reference[i], rtol=1e-5, atol=1e-5)
        # the MoE input is the layer's post-attention norm of (decoder input + attention output)
        layer = model.model.layers[i]
        h = hidden_states[i]
        pos = torch.arange(L).unsqueeze(0)
        cos_sin = model.model.rotary_emb(h, pos)
        attn, _ = layer.self_attn(layer.input_layernorm(h), position_embeddings=cos_sin, attention_mask=None)
        torch.testing.assert_close(x, layer.post_attention_layernorm(h + attn), rtol=1e-5, atol=1e-5)
    # the resume state left behind holds the last layer's decoder inputs
    state = load_file(str(tmp_path / "state" / "hidden_002.safetensors"))
    torch.testing.assert_close(torch.cat([state[k] for k in sorted(state)]), hidden_states[2], rtol=1e-5, atol=1e-5)


def test_writer_matches_safetensors_and_is_byte_stable(tmp_path: Path) -> None:
    a = [torch.randn(3, 4, 5), torch.randn(2, 4, 5)]
    b = [torch.arange(6, dtype=torch.int64).reshape(6, 1)]
    sha, size = write_chunked_safetensors(tmp_path / "t.safetensors", {"x": a, "ids": b}, metadata={"k": "v", "a": "1"})
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert torch.equal(loaded["x"], torch.cat(a)) and torch.equal(loaded["ids"], b[0])
    assert sha == sha256_file(tmp_path / "t.safetensors") and size == (tmp_path / "t.safetensors").stat().st_size
    sha2, _ = write_chunked_safetensors(tmp_path / "u.safetensors", {"ids": b, "x": a}, metadata={"a": "1", "k": "v"})
    assert sha2 == sha
    write_chunked_safetensors(tmp_path / "h.safetensors", {"x": a}, dtype=torch.bfloat16)
    assert torch.equal(load_file(str(tmp_path / "h.safetensors"))["x"], torch.cat(a).to(torch.bfloat16))
    assert not list(tmp_path.glob("*.tmp-*"))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("crash_at", [0, 1])
def test_resume_after_interruption_is_byte_identical(model: Any, input_ids: torch.Tensor, tmp_path: Path, crash_at: int) -> None:
    clean = run_cache(model, input_ids, tmp_path / "clean")

    def crash(info: Any) -> None:
        if info.layer == crash_at:
            raise Interrupt

    work = tmp_path / "work"
    with pytest.raises(Interrupt):
        run_cache(model, input_ids, work, on_layer=crash)
    assert sorted(shard_bytes(work)) == [shard_name(i) for i in range(crash_at + 1)]
    # a kill -9 during a write leaves a temporary behind; the restart must ignore and remove it
    (work / "layers" / f"{shard_name(crash_at + 1)}.tmp-deadbeef").write_bytes(b"partial")
    resumed = run_cache(model, input_ids, work)
    assert resumed.start_layer == crash_at  # restarted from the saved inputs, not from layer 0
    assert resumed.layers_run == 3 - crash_at
    assert shard_bytes(work) == shard_bytes(tmp_path / "clean")
    assert resumed.sha256 == clean.sha256
    assert not list(work.rglob("*.tmp-*"))
    again = run_cache(model, input_ids, work)  # everything done: nothing runs
    assert again.start_layer is None and again.layers_run == 0 and again.sha256 == clean.sha256


def test_interrupted_between_state_and_shard(model: Any, input_ids: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash inside the shard write (after the layer's inputs were saved) resumes at that layer."""
    import pipeline.activations as act

    clean = run_cache(model, input_ids, tmp_path / "clean")
    real = act.write_chunked_safetensors

    def failing(path: Any, tensors: Any, **kw: Any) -> Any:
        if Path(path).name == shard_name(2):
            raise Interrupt
        return real(path, tensors, **kw)

    monkeypatch.setattr(act, "write_chunked_safetensors", failing)
    with pytest.raises(Interrupt):
        run_cache(model, input_ids, tmp_path / "work")
    monkeypatch.setattr(act, "write_chunked_safetensors", real)
    resumed = run_cache(model, input_ids, tmp_path / "work")
    assert resumed.start_layer == 2 and resumed.layers_run == 1
    assert shard_bytes(tmp_path / "work") == shard_bytes(tmp_path / "clean") and resumed.sha256 == clean.sha256


def test_commit_and_reader(model: Any, input_ids: torch.Tensor, tmp_path: Path) -> None:
    run = run_cache(model, input_ids, tmp_path / "work", dtype=torch.bfloat16)
    out = tmp_path / "out"
    manifest = commit_cache(run, out, model_fingerprint="fp1", calibration="general", calibration_fingerprint="cal1")
    assert manifest["dtype"] == "bfloat16" and manifest["moe_layers"] == [0, 1, 2]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    cache = ActivationCache(out, expected_model_fingerprint="fp1")
    assert cache.layers == [0, 1, 2] and cache.calibration == "general" and cache.manifest["seq_len"] == L
    reference, _ = full_forward_moe_inputs(model, input_ids)
    x = cache.load(1)
    assert x.dtype == torch.bfloat16 and x.shape == (N, L, model.config.hidden_size)
    torch.testing.assert_close(x, reference[1].to(torch.bfloat16))
    assert torch.equal(cache.load(1), x)

    with pytest.raises(PipelineError, match=r"activations were made from another model .*rerun the activations stage"):
        ActivationCache(out, expected_model_fingerprint="other")
    with pytest.raises(PipelineError, match=r"layer 7 is not in the activation cache"):
        cache.load(7)


def committed(model: Any, input_ids: torch.Tensor, tmp_path: Path) -> Path:
    run = run_cache(model, input_ids, tmp_path / "work")
    commit_cache(run, tmp_path / "out", model_fingerprint="fp", calibration="general", calibration_fingerprint="c")
    return tmp_path / "out"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_reader_rejects_damaged_shards(model: Any, input_ids: torch.Tensor, tmp_path: Path, damage: str) -> None:
    out = committed(model, input_ids, tmp_path)
    path = out / "layers" / shard_name(0)
    data = path.read_bytes()
    path.unlink()  # the output is hard-linked to the work dir: write a new file
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(PipelineError, match=r"^activation shard .*layer_000.safetensors (is missing|is corrupt or truncated)") as exc:
        ActivationCache(out).load(0)
    assert "\n" not in str(exc.value)


def test_reader_rejects_non_finite_values(model: Any, input_ids: torch.Tensor, tmp_path: Path) -> None:
    out = committed(model, input_ids, tmp_path)
    path = out / "layers" / shard_name(2)
    x = load_file(str(path))["x"]
    x[1, 3, 0] = float("nan")
    path.unlink()
    sha, size = write_chunked_safetensors(path, {"x": [x]})
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["2"].update(sha256=sha, bytes=size)  # only the values are wrong
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match=r"layer_002.safetensors contains NaN or inf values \(layer 2\)"):
        ActivationCache(out).load(2)


def test_reader_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"manifest.json does not exist: run the activations stage"):
        ActivationCache(tmp_path)


def test_progressive_mode_feeds_the_pruned_model(model: Any, input_ids: torch.Tensor, tmp_path: Path) -> None:
    """Replacing layer 0's block in on_step makes layer 1's cached input that of the pruned model."""
    import copy

    adapter = get_adapter(model.config)
    pruned_model = copy.deepcopy(model)
    kept = [0, 2, 3, 5]
    config = adapter.pruned_config(model.config, len(kept))

    def prune_layer0(step: Any) -> None:
        if step.index == 0:
            step.replace_block(adapter, adapter.prune_block(step.block, kept, config, 0))

    run = cache_activations(
        pruned_model, adapter, input_ids, work_dir=tmp_path / "w", dtype=torch.float32, batch_size=BATCH,
        progress=False, on_step=prune_layer0,
    )
    reference_model = copy.deepcopy(model)
    layer0 = adapter.decoder_layers(reference_model)[0]
    adapter.set_moe_block(layer0, adapter.prune_block(adapter.moe_block(layer0), kept, config, 0))
    pruned_ref, _ = full_forward_moe_inputs(reference_model, input_ids)
    original_ref, _ = full_forward_moe_inputs(model, input_ids)
    x0, x1 = (load_file(str(run.files[i]))["x"] for i in (0, 1))
    torch.testing.assert_close(x0, original_ref[0], rtol=1e-5, atol=1e-5)  # layer 0's input is not affected
    torch.testing.assert_close(x1, pruned_ref[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x1, original_ref[1], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cache_matches_cpu_and_resumes_identically(input_ids: torch.Tensor, tmp_path: Path) -> None:
    cpu_run = run_cache(tiny_model("mixtral", layers=3, seed=1), input_ids, tmp_path / "cpu")
    clean = run_cache(tiny_model("mixtral", layers=3, seed=1), input_ids, tmp_path / "clean", device="cuda")
    for i in clean.moe_layers:
        torch.testing.assert_close(load_file(str(clean.files[i]))["x"], load_file(str(cpu_run.files[i]))["x"], rtol=1e-3, atol=1e-3)

    def crash(info: Any) -> None:
        if info.layer == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_cache(tiny_model("mixtral", layers=3, seed=1), input_ids, tmp_path / "work", device="cuda", on_layer=crash)
    resumed = run_cache(tiny_model("mixtral", layers=3, seed=1), input_ids, tmp_path / "work", device="cuda")
    assert resumed.start_layer == 1 and shard_bytes(tmp_path / "work") == shard_bytes(tmp_path / "clean")
