"""Per-layer expert counts (search.allocation: global): physically smaller layers, one loading call, re-pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.export import Selection, export_pruned
from pipeline.models import get_adapter, supported_model_types
from pipeline.models.base import MoEAdapter
from pipeline.models.loading import COUNTS_KEY, load_model
from tests.factory import TINY_CONFIGS, tiny_model

MODEL_TYPES = [t for t in sorted(TINY_CONFIGS) if t in supported_model_types()]


def calibration_ids(vocab: int = 320) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def per_layer_selection(model: nn.Module, seed: int = 0) -> Selection:
    """A non-uniform selection: the MoE layers keep top_k, then n - 1, then ..., with r the (integer) mean."""
    adapter = get_adapter(model.config)
    n, k = adapter.num_experts(model.config), adapter.top_k(model.config)
    layers = adapter.moe_layer_indices(model)
    gen = torch.Generator().manual_seed(seed)
    sizes = [k if j % 2 == 0 else n - 1 for j in range(len(layers))]
    total = sum(sizes)
    while total % len(layers):  # r x layers experts in all
        j = next(j for j, s in enumerate(sizes) if s < n)
        sizes[j] += 1
        total += 1
    kept = {i: sorted(torch.randperm(n, generator=gen)[:s].tolist()) for i, s in zip(layers, sizes, strict=True)}
    data = {"r": total // len(layers), "num_experts": n, "top_k": k, "allocation": "global", "strategy": "enumerate",
            "layers": [{"layer": i, "kept": ids} for i, ids in kept.items()]}
    return Selection.from_dict(data, origin="per-layer selection")


def mask_dropped(model: nn.Module, kept: dict[int, list[int]]) -> list:
    """Restrict each MoE layer's routing to ``kept`` (the family's rule on the kept experts' logits)."""
    adapter = get_adapter(model.config)
    handles = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        block = adapter.moe_block(layer)
        if block is None or i not in kept:
            continue
        seen: dict[str, torch.Tensor] = {}
        router = getattr(block, adapter.router_attr)
        if type(adapter).add_router_transform is not MoEAdapter.add_router_transform:  # Llama 4: (sigmoid scores, logits)
            handles.append(router.register_forward_hook(_masked_linear_router(kept[i])))
            continue
        handles.append(router.register_forward_pre_hook(lambda _m, args, seen=seen: seen.__setitem__("x", args[0])))

        def transform(w, idx, block=block, seen=seen, ids=kept[i]):
            x = seen["x"].reshape(-1, seen["x"].shape[-1])
            new_w, new_idx = adapter.route(block, adapter.router_logits(block, x), model.config, ids)
            return new_w.to(w.dtype).view_as(w), new_idx.view_as(idx)

        handles.append(adapter.add_router_transform(block, transform))
    return handles


def _masked_linear_router(ids: list[int]):
    """Llama 4's router rule (sigmoid of the top-k logits, -inf elsewhere) on the kept experts' logits only."""

    def hook(module: nn.Module, _inputs, output):
        _scores, logits = output
        dropped = torch.ones(logits.shape[-1], dtype=torch.bool)
        dropped[ids] = False
        masked = logits.masked_fill(dropped, float("-inf"))
        value, index = torch.topk(masked, module.top_k, dim=1)
        scores = torch.full_like(logits, float("-inf")).scatter_(1, index, value)
        return torch.sigmoid(scores.float()).to(logits.dtype), logits

    return hook


def expert_params(model: nn.Module, layer: int) -> int:
    """Parameters of one routed expert of ``layer`` (its slices of every expert tensor, router rows included)."""
    adapter = get_adapter(model.config)
    block = adapter.moe_block(adapter.decoder_layers(model)[layer])
    n = adapter.block_num_experts(block)
    params = dict(block.named_parameters())
    return sum(t.numel() // n for name, t in params.items() if adapter.expert_tensor_dim(name, t, n) is not None)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_per_layer_export_loads_and_equals_the_masked_original(tmp_path: Path, model_type: str) -> None:
    original = tiny_model(model_type)
    adapter = get_adapter(original.config)
    if len(adapter.moe_layer_indices(original)) < 2:
        pytest.skip("one MoE layer: every split of the budget is uniform")
    selection = per_layer_selection(original)
    assert not selection.uniform
    model = tiny_model(model_type)
    report = export_pruned(model, adapter, selection, tmp_path / "m", progress=False)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config[COUNTS_KEY] == {str(i): len(ids) for i, ids in selection.kept.items()}
    assert config["kept_experts"] == {str(i): ids for i, ids in selection.kept.items()}
    n = adapter.num_experts(original.config)
    removed = sum((n - len(ids)) * expert_params(original, i) for i, ids in selection.kept.items())
    assert report.params_before - report.params_after == removed
    loaded = load_model(tmp_path / "m")
    for i, ids in selection.kept.items():
        assert adapter.block_num_experts(adapter.moe_block(adapter.decoder_layers(loaded)[i])) == len(ids)
    assert sum(p.numel() for p in loaded.parameters()) == report.params_after
    ids = calibration_ids(int(original.config.get_text_config().vocab_size))
    with torch.no_grad():
        unmasked = original(input_ids=ids).logits
    handles = mask_dropped(original, selection.kept)
    with torch.no_grad():
        expected = original(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unmasked, expected, rtol=1e-4, atol=1e-5)  # the masking matters


def test_plain_transformers_refuses_a_per_layer_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    export_pruned(model, get_adapter(model.config), per_layer_selection(model), tmp_path / "m", progress=False)
    with pytest.raises((RuntimeError, ValueError), match="size|shape"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    card = (tmp_path / "m" / "README.md").read_text()
    assert "load_model(PATH)" in card and "experts_per_layer" in card


def test_uniform_counts_write_the_plain_checkpoint(tmp_path: Path) -> None:
    model = tiny_model()
    adapter = get_adapter(model.config)
    data = {"r": 5, "num_experts": 8, "top_k": 2, "allocation": "global",
            "layers": [{"layer": i, "kept": [0, 1, 2, 3, 7]} for i in adapter.moe_layer_indices(model)]}
    export_pruned(model, adapter, Selection.from_dict(data), tmp_path / "m", progress=False)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert COUNTS_KEY not in config and "allocation" not in config["pruning"] and config["num_local_experts"] == 5


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_skipping_on_a_per_layer_checkpoint(tmp_path: Path, model_type: str) -> None:
    """Thresholds per layer, routing of each smaller layer as its own router does, skip checkpoint loads."""
    from pipeline import skipping
    from pipeline.streaming import stream_layers

    model = tiny_model(model_type)
    adapter = get_adapter(model.config)
    export_pruned(model, adapter, per_layer_selection(model, seed=1), tmp_path / "m", progress=False)
    loaded = load_model(tmp_path / "m")
    ids = calibration_ids(int(loaded.config.get_text_config().vocab_size))
    for step in stream_layers(loaded, adapter, ids, batch_size=2, device=torch.device("cpu"), progress=False):
        if step.block is None:
            continue
        x = step.moe_tokens()
        weights, experts = adapter.route(step.block, adapter.router_logits(step.block, x), loaded.config)
        own_w, own_ids = adapter.router_decisions(step.block, x)
        order, own_order = experts.sort(-1), own_ids.sort(-1)
        assert torch.equal(order.values, own_order.values)
        torch.testing.assert_close(weights.gather(-1, order.indices), own_w.float().gather(-1, own_order.indices))
    thresholds = skipping.calibrate_thresholds(loaded, adapter, ids, 0.5, 2, progress=False)
    counts = json.loads((tmp_path / "m" / "config.json").read_text())[COUNTS_KEY]
    assert {str(i) for i in thresholds} == set(counts) and all(0 < b <= 1 for b in thresholds.values())
    stats = skipping.measure_skipping(loaded, adapter, ids, thresholds, 2, progress=False)
    assert 0 < stats["skipped_fraction"] < 1 and set(stats["layers"]) == set(counts)
    skipping.write_skip_checkpoint(tmp_path / "m", tmp_path / "skip", thresholds)
    again = load_model(tmp_path / "skip")
    with torch.no_grad():
        plain = again(input_ids=ids).logits
        with skipping.enable(again, {i: 0.0 for i in thresholds}):
            unskipped = again(input_ids=ids).logits
        with skipping.enable(again) as handle:  # the thresholds in config.json
            skipped = again(input_ids=ids).logits
    torch.testing.assert_close(unskipped, plain)
    assert handle.stats()["skipped_fraction"] > 0 and not torch.equal(skipped, plain)


def test_repruning_a_per_layer_export_records_original_ids(tmp_path: Path) -> None:
    """A non-uniform export pruned again (uniformly): kept_experts in the original model's ids, chain in the card."""
    model = tiny_model()
    adapter = get_adapter(model.config)
    first = per_layer_selection(model, seed=3)
    export_pruned(model, adapter, first, tmp_path / "one", progress=False)
    once = load_model(tmp_path / "one")
    second = Selection.from_dict({
        "r": 2, "num_experts": max(first.counts.values()), "top_k": 2, "strategy": "enumerate",
        "layers": [{"layer": i, "kept": [0, len(ids) - 1]} for i, ids in first.kept.items()],
    })
    export_pruned(once, get_adapter(once.config), second, tmp_path / "two", progress=False)
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["kept_experts"] == {str(i): [ids[0], ids[-1]] for i, ids in first.kept.items()}
    assert COUNTS_KEY not in config and config["num_local_experts"] == 2
    assert config["pruning"]["chain"][0]["allocation"] == "global"
    assert "## Chain of prunings" in (tmp_path / "two" / "README.md").read_text()
    twice = load_model(tmp_path / "two")
    ids = calibration_ids()
    original = tiny_model()
    handles = mask_dropped(original, {i: [v[0], v[-1]] for i, v in first.kept.items()})
    with torch.no_grad():
        expected = original(input_ids=ids).logits
    for h in handles:
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(twice(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
