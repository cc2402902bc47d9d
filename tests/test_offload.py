"""Decoder layers read from the checkpoint one at a time (runtime.offload): same results, bounded memory."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import pytest
import torch

from pipeline import skipping
from pipeline.evaluate.memory import PeakMemory
from pipeline.models import get_adapter
from pipeline.models.loading import load_model
from pipeline.offload import layer_source, should_offload
from pipeline.runtime import release_freed_memory
from pipeline.config import SearchParams
from pipeline.search.run import run_layerwise, run_progressive
from pipeline.streaming import stream_layers
from tests.factory import TINY_CONFIGS, tiny_model

CPU = torch.device("cpu")


def save_tiny_checkpoint(path: Path, model_type: str, **overrides) -> Path:
    """A tiny random model saved as a standard checkpoint (weights and config only)."""
    tiny_model(model_type, **overrides).save_pretrained(path)
    return path


def _ids(vocab: int, n: int = 3, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _stream(model, ids, **kw):
    adapter = get_adapter(model.config)
    return [
        (s.index, torch.cat(s.hidden_in), [x.clone() for x in s.moe_input])
        for s in stream_layers(model, adapter, ids, batch_size=2, device=CPU, progress=False, **kw)
    ]


def _all_layers_meta(model) -> bool:
    layers = get_adapter(model.config).decoder_layers(model)
    return all(p.is_meta for layer in layers for p in layer.parameters())


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_offloaded_stream_equals_fully_loaded_model(model_type: str, tmp_path: Path) -> None:
    """Every family: layer inputs and MoE inputs bit-identical, weights converted as from_pretrained does."""
    path = save_tiny_checkpoint(tmp_path / "m", model_type)
    full = load_model(path)
    lazy = load_model(path, offload="layers")
    assert layer_source(lazy) is not None and layer_source(full) is None
    assert _all_layers_meta(lazy)
    ids = _ids(full.config.vocab_size)
    reference, streamed = _stream(full, ids), _stream(lazy, ids)
    assert [s[0] for s in streamed] == [s[0] for s in reference]
    for (i, h_ref, x_ref), (_, h, x) in zip(reference, streamed, strict=True):
        assert torch.equal(h, h_ref), f"layer {i} input differs"
        assert len(x) == len(x_ref) and all(torch.equal(a, b) for a, b in zip(x, x_ref, strict=True)), f"layer {i} MoE input differs"
    assert _all_layers_meta(lazy), "layers must be released after the stream"


def test_loaded_layer_equals_from_pretrained_tensors(tmp_path: Path) -> None:
    """Fused experts (the checkpoint stores per-expert w1/w2/w3), norms, rotary buffers: all equal."""
    path = save_tiny_checkpoint(tmp_path / "m", "mixtral", layers=3)
    full, lazy = load_model(path), load_model(path, offload="layers")
    source = layer_source(lazy)
    assert source is not None
    full_state = dict(full.named_parameters()) | dict(full.named_buffers())
    for name, tensor in [*lazy.named_parameters(), *lazy.named_buffers()]:
        if not tensor.is_meta:
            assert torch.equal(tensor, full_state[name]), name
    layer = source.load(1, CPU)
    prefix = "model.layers.1."
    got = {prefix + n: t for n, t in [*layer.named_parameters(), *layer.named_buffers()]}
    assert got and all(torch.equal(t, full_state[n]) for n, t in got.items())
    assert got[prefix + "mlp.experts.gate_up_proj"].shape[0] == 8
    source.release(1)
    assert _all_layers_meta(lazy)


def test_offloaded_bfloat16_matches_from_pretrained(tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path / "m", "qwen3_moe")
    full = load_model(path, dtype=torch.bfloat16)
    lazy = load_model(path, dtype=torch.bfloat16, offload="layers")
    ids = _ids(full.config.vocab_size)
    for (_, h_ref, x_ref), (_, h, x) in zip(_stream(full, ids), _stream(lazy, ids), strict=True):
        assert h.dtype == torch.bfloat16 and torch.equal(h, h_ref)
        assert all(torch.equal(a, b) for a, b in zip(x, x_ref, strict=True))


def test_search_and_skip_thresholds_identical_with_offload(tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path / "m", "mixtral", layers=3)
    full, lazy = load_model(path), load_model(path, offload="layers")
    adapter = get_adapter(full.config)
    ids = _ids(full.config.vocab_size, n=4, length=12, seed=3)
    settings = SearchParams(r=4, strategy="enumerate", baselines=["frequency"])
    # layerwise: cached inputs of the full model, blocks materialised one at a time
    inputs = {s.index: torch.cat(s.moe_input) for s in stream_layers(full, adapter, ids, batch_size=2, device=CPU, progress=False)}
    a = run_layerwise(full, adapter, full.config, sorted(inputs), inputs.__getitem__, settings)
    b = run_layerwise(lazy, adapter, lazy.config, sorted(inputs), inputs.__getitem__, settings)
    assert [r.kept for r in a] == [r.kept for r in b]
    assert all(torch.equal(x.losses, y.losses) for x, y in zip(a, b, strict=True))
    assert _all_layers_meta(lazy)
    # progressive: the stream prunes each layer before the next one runs
    pa = run_progressive(full, adapter, full.config, ids, settings, batch_size=2)
    pb = run_progressive(lazy, adapter, lazy.config, ids, settings, batch_size=2)
    assert [(r.kept, r.loss) for r in pa] == [(r.kept, r.loss) for r in pb]
    # skip thresholds and the skipping measured with them
    full2, lazy2 = load_model(path), load_model(path, offload="layers")
    t_full = skipping.calibrate_thresholds(full2, adapter, ids, 0.5, 2, CPU, progress=False)
    t_lazy = skipping.calibrate_thresholds(lazy2, adapter, ids, 0.5, 2, CPU, progress=False)
    assert t_full == t_lazy
    s_full = skipping.measure_skipping(full2, adapter, ids, t_full, 2, CPU, progress=False)
    s_lazy = skipping.measure_skipping(lazy2, adapter, ids, t_lazy, 2, CPU, progress=False)
    assert s_full == s_lazy and 0 < s_full["skipped_fraction"] < 1


def _big_layers_checkpoint(path: Path, layers: int) -> Path:
    """Mixtral whose decoder layers (about 12.6 MB each in float32) dwarf everything else."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=320, hidden_size=128, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _stream_peak(path: Path, offload: str) -> int:
    """Peak RSS above the starting point while loading the model and streaming all of its layers."""
    gc.collect()
    release_freed_memory()
    ids = _ids(320, n=2, length=16)
    with PeakMemory() as mem:
        start = _current_rss()
        model = load_model(path, offload=offload)
        for _ in stream_layers(model, get_adapter(model.config), ids, batch_size=2, device=CPU, progress=False):
            pass
        del model
    gc.collect()
    release_freed_memory()
    if mem.rss_scope != "block":
        pytest.skip("peak RSS of a block needs Linux's /proc/self/clear_refs")
    assert mem.peak_rss_bytes is not None
    return mem.peak_rss_bytes - start


def _current_rss() -> int:
    from pipeline.evaluate.memory import current_rss_bytes

    return current_rss_bytes()


def test_peak_rss_does_not_grow_with_the_number_of_layers(tmp_path: Path) -> None:
    shallow = _big_layers_checkpoint(tmp_path / "l2", 2)
    deep = _big_layers_checkpoint(tmp_path / "l8", 8)
    layer_bytes = 8 * 3 * 128 * 1024 * 4
    _stream_peak(shallow, "layers")  # warm-up: imports and allocator pools
    grow_offload = _stream_peak(deep, "layers") - _stream_peak(shallow, "layers")
    grow_full = _stream_peak(deep, "none") - _stream_peak(shallow, "none")
    # whole loading holds 6 more layers; streaming from the checkpoint holds one layer either way
    assert grow_full > 4 * layer_bytes, grow_full
    assert grow_offload < 1.5 * layer_bytes, (grow_offload, grow_full)


def test_auto_offload_follows_checkpoint_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_tiny_checkpoint(tmp_path / "m", "mixtral")
    assert not should_offload("none", path, torch.float32) and should_offload("layers", path, torch.float32)
    assert not should_offload("auto", path, torch.float32)  # a few hundred kB against the machine's RAM
    import pipeline.offload as offload

    monkeypatch.setattr(offload, "available_ram_bytes", lambda: 1000)  # a machine with 1 kB free
    assert should_offload("auto", path, torch.float32)
    assert layer_source(load_model(path, offload="auto")) is not None


def test_unsupported_checkpoint_falls_back_to_whole_loading(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint without safetensors weights is loaded whole, with a log line saying why."""
    from safetensors.torch import load_file

    path = save_tiny_checkpoint(tmp_path / "m", "mixtral")
    state = load_file(path / "model.safetensors")
    torch.save(state, path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="pipeline.models.loading"):
        model = load_model(path, offload="layers")
    assert layer_source(model) is None and not _all_layers_meta(model)
    assert any("loading the whole model instead" in r.getMessage() for r in caplog.records)
    reference = load_model(path)
    ids = _ids(model.config.vocab_size)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(_stream(model, ids), _stream(reference, ids), strict=True))


def test_export_from_offloaded_model_equals_export_from_loaded_model(tmp_path: Path) -> None:
    """Export reads each layer from the checkpoint, prunes it and keeps only the pruned layer."""
    from safetensors.torch import load_file

    from pipeline.export import Selection, export_pruned

    path = save_tiny_checkpoint(tmp_path / "m", "qwen3_moe")  # a dense first layer, then MoE layers
    full, lazy = load_model(path), load_model(path, offload="layers")
    adapter = get_adapter(full.config)
    layers = adapter.moe_layer_indices(full)
    selection = Selection.from_dict(
        {"r": 4, "num_experts": 8, "top_k": 2, "layers": [{"layer": i, "kept": [0, 2, 5, 7]} for i in layers]}
    )
    ids = _ids(full.config.vocab_size)
    inputs = {
        s.index: torch.cat(s.moe_input)
        for s in stream_layers(full, adapter, ids, batch_size=2, device=CPU, progress=False)
        if s.block is not None
    }
    a = export_pruned(full, adapter, selection, tmp_path / "a", inputs=inputs.__getitem__, progress=False)
    b = export_pruned(lazy, adapter, selection, tmp_path / "b", inputs=inputs.__getitem__, progress=False)
    assert layer_source(lazy) is None and not any(p.is_meta for p in lazy.parameters())
    assert (a.params_before, a.params_after) == (b.params_before, b.params_after)
    assert [c.rel_error for c in a.checks] == [c.rel_error for c in b.checks]
    ta, tb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
