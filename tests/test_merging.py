"""Merging dropped experts into kept ones, and static top-k reduction, on tiny random models of every family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.export import Selection, export_pruned
from pipeline.merging import (
    STRENGTHS,
    expert_similarity,
    merge_weights,
    permute_neurons,
    plan_layer,
    routing_mass,
    scaled_groups,
)
from pipeline.models import get_adapter
from pipeline.models.loading import load_model
from tests.factory import tiny_model, tiny_tokenizer
from tests.test_export import MODEL_TYPES, cached_inputs, calibration_ids, load, logits, selection_dict

KEPT = [0, 1, 2, 3, 4, 5]  # of 8: experts 6 and 7 are dropped


def _randomise_experts(model) -> None:
    """Every fused expert tensor random (some families initialise biases to zero, which would hide layout errors)."""
    adapter = get_adapter(model.config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in adapter.moe_layer_indices(model):
            for t in adapter.expert_tensors(adapter.moe_block(adapter.decoder_layers(model)[i])).values():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_neuron_layout_and_merge_weights(model_type: str) -> None:
    """Per family: permuting an expert's neurons by the adapter's layout leaves its output unchanged, and the
    merge weights are non-negative and sum to one per kept expert, every dropped expert in one group."""
    model = tiny_model(model_type)
    _randomise_experts(model)
    adapter = get_adapter(model.config)
    i = adapter.moe_layer_indices(model)[0]
    block = adapter.moe_block(adapter.decoder_layers(model)[i])
    x = torch.randn(2, 5, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0))
    flat = x.reshape(-1, x.shape[-1])
    tensors = adapter.expert_tensors(block)
    assert tensors, f"{model_type}: no fused expert tensors"
    with torch.no_grad():
        before = adapter.expert_outputs(block, flat, [3])
        expert = {name: t[3].clone() for name, t in tensors.items()}
        sizes = {name: adapter.neuron_layout[name] for name in expert if name in adapter.neuron_layout}
        axis, groups, _ = next(iter(sizes.values()))
        f = expert[next(iter(sizes))].shape[axis] // groups
        perm = torch.randperm(f, generator=torch.Generator().manual_seed(2))
        for name, value in permute_neurons(adapter, expert, perm).items():
            tensors[name][3].copy_(value)
        after = adapter.expert_outputs(block, flat, [3])
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert not torch.equal(tensors[next(iter(sizes))][3], expert[next(iter(sizes))])  # it did permute

    plan = plan_layer(adapter, block, model.config, x, KEPT, "output", i)
    assert set(plan.groups) == set(KEPT)
    members = [e for g in plan.groups.values() for e in g]
    assert sorted(members) == list(range(8))  # each expert in exactly one group
    for k, group in plan.groups.items():
        assert all(w >= 0 for w in group.values())
        assert sum(group.values()) == pytest.approx(1.0, abs=1e-12)
        assert k in group


def test_merge_weights_follow_routing_mass() -> None:
    mass = torch.tensor([3.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    groups = merge_weights(mass, {2: 0, 3: 0}, [0, 1])
    assert groups == {0: {0: 0.75, 2: 0.0, 3: 0.25}, 1: {1: 1.0}}
    assert merge_weights(torch.zeros(3, dtype=torch.float64), {2: 1}, [0, 1])[1] == {1: 1.0, 2: 0.0}
    half = scaled_groups(groups, 0.5)
    assert half == {0: {0: 0.875, 2: 0.0, 3: 0.125}, 1: {1: 1.0}} and scaled_groups(groups, 1.0) == groups


@pytest.mark.parametrize(("model_type", "method"), [("mixtral", "output"), ("mixtral", "router"), ("qwen2_moe", "output"), ("gpt_oss", "router")])
def test_merging_identical_experts_reproduces_the_unmerged_output(tmp_path: Path, model_type: str, method: str) -> None:
    """Dropped experts that are copies of kept ones merge into them bit-exactly: merged logits == pruned logits,
    and the card and config record what went where."""
    model = tiny_model(model_type)
    _randomise_experts(model)
    adapter = get_adapter(model.config)
    with torch.no_grad():
        for i in adapter.moe_layer_indices(model):
            block = adapter.moe_block(adapter.decoder_layers(model)[i])
            for dropped, twin in ((6, 1), (7, 3)):
                for t in adapter.expert_tensors(block).values():
                    t[dropped].copy_(t[twin])
                adapter.router_weight(block)[dropped].copy_(adapter.router_weight(block)[twin])
    ids = calibration_ids()
    xs = cached_inputs(model, ids)
    data = selection_dict(model, r=6)
    for layer in data["layers"]:
        layer["kept"] = KEPT
    selection = Selection.from_dict(data)
    report = export_pruned(
        model, adapter, selection, tmp_path / "pruned", inputs=xs.__getitem__, progress=False,
        merge=method, merged_dir=tmp_path / "merged", tokenizer=tiny_tokenizer(),
    )
    pruned, merged = load(tmp_path / "pruned"), load(tmp_path / "merged")
    assert torch.equal(logits(merged, ids), logits(pruned, ids))
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    card = (tmp_path / "merged" / "README.md").read_text()
    for check in report.checks:
        assert check.merge is not None and check.merge.assignment == {6: 1, 7: 3}
        assert check.merge.loss_merged == check.merge.loss_pruned
        record = config["merged_experts"][str(check.layer)]
        assert set(record) == {"1", "3"} and set(record["1"]) == {"1", "6"} and set(record["3"]) == {"3", "7"}
        assert f"| {check.layer} | 1 | 1: " in card and f"| {check.layer} | 3 | 3: " in card and ", 7: " in card
    assert config["merging"]["method"] == method
    assert "merged_experts" not in json.loads((tmp_path / "pruned" / "config.json").read_text())
    metrics = report.metrics()
    assert metrics["reconstruction_loss/merged"] == metrics["reconstruction_loss/pruned"]


def test_merging_identical_experts_on_a_per_layer_export_reproduces_the_unmerged_output(tmp_path: Path) -> None:
    """A non-uniform selection (6 experts in one layer, 4 in the next): each dropped expert is a copy of a kept
    one, so both checkpoints keep their per-layer counts, load through ``load_model``, and give equal logits."""
    model = tiny_model("mixtral")
    _randomise_experts(model)
    adapter = get_adapter(model.config)
    layers = adapter.moe_layer_indices(model)
    assert len(layers) >= 2
    twins = {layers[0]: {6: 1, 7: 3}, layers[1]: {4: 0, 5: 1, 6: 2, 7: 3}}
    with torch.no_grad():
        for i, pairs in twins.items():
            block = adapter.moe_block(adapter.decoder_layers(model)[i])
            for dropped, twin in pairs.items():
                for t in adapter.expert_tensors(block).values():
                    t[dropped].copy_(t[twin])
                adapter.router_weight(block)[dropped].copy_(adapter.router_weight(block)[twin])
    kept = {i: sorted(set(range(8)) - set(twins.get(i, {}))) if i in twins else list(range(8)) for i in layers}
    data = {"r": sum(map(len, kept.values())) // len(layers), "num_experts": 8, "top_k": 2, "allocation": "global",
            "strategy": "enumerate", "layers": [{"layer": i, "kept": ids} for i, ids in kept.items()]}
    if sum(map(len, kept.values())) % len(layers):
        pytest.skip("the tiny model's layer count makes this split non-integer")
    selection = Selection.from_dict(data)
    assert not selection.uniform
    ids = calibration_ids()
    report = export_pruned(model, adapter, selection, tmp_path / "pruned", inputs=cached_inputs(model, ids).__getitem__,
                           progress=False, merge="output", merged_dir=tmp_path / "merged", tokenizer=tiny_tokenizer())
    pruned, merged = load_model(tmp_path / "pruned").eval(), load_model(tmp_path / "merged").eval()
    for i, ids_kept in kept.items():
        assert adapter.block_num_experts(adapter.moe_block(adapter.decoder_layers(merged)[i])) == len(ids_kept)
    assert torch.equal(logits(merged, ids), logits(pruned, ids))
    record = json.loads((tmp_path / "merged" / "config.json").read_text())["merged_experts"]
    for check in report.checks:
        if check.layer in twins:
            assert check.merge is not None and check.merge.assignment == twins[check.layer]
            assert set(record[str(check.layer)]) == {str(t) for t in twins[check.layer].values()}


def test_merging_changes_distinct_experts_and_reports_both_losses(tmp_path: Path) -> None:
    model = tiny_model()
    adapter = get_adapter(model.config)
    ids = calibration_ids()
    xs = cached_inputs(model, ids)
    selection = Selection.from_dict(selection_dict(model, r=4, seed=2))
    report = export_pruned(model, adapter, selection, tmp_path / "p", inputs=xs.__getitem__, progress=False,
                           merge="output", merged_dir=tmp_path / "m")
    if any(c.merge.strength > 0 for c in report.checks):
        assert not torch.equal(logits(load(tmp_path / "m"), ids), logits(load(tmp_path / "p"), ids))
    for check in report.checks:
        m = check.merge
        assert m is not None and m.loss_pruned > 0 and m.loss_merged > 0
        assert set(m.loss_by_strength) == set(STRENGTHS) and m.loss_by_strength[0.0] == pytest.approx(m.loss_pruned)
        assert m.loss_merged == min(m.loss_by_strength.values()) <= m.loss_pruned  # never worse than pruning
        assert m.loss_merged == m.loss_by_strength[m.strength]
        mass = routing_mass(adapter, adapter.moe_block(adapter.decoder_layers(tiny_model())[check.layer]),
                            model.config, xs[check.layer])
        assert m.mass == pytest.approx({e: float(v) for e, v in enumerate(mass.tolist())})


def test_router_similarity_is_symmetric_with_unit_diagonal() -> None:
    model = tiny_model()
    adapter = get_adapter(model.config)
    block = adapter.moe_block(adapter.decoder_layers(model)[0])
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    for method in ("output", "router"):
        s = expert_similarity(adapter, block, x, method)
        torch.testing.assert_close(s, s.T)
        torch.testing.assert_close(s.diagonal(), torch.ones(8, dtype=torch.float64))


# -- static top-k reduction ------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_static_top_k_checkpoint_routes_k_experts_by_the_family_rule(tmp_path: Path, model_type: str) -> None:
    """export top_k=1: plain transformers loads it; its router picks 1 expert with the weights the adapter's rule
    gives for the lowered config (renormalised where the family renormalises)."""
    model = tiny_model(model_type)
    adapter = get_adapter(model.config)
    n, k = adapter.num_experts(model.config), adapter.top_k(model.config)
    selection = Selection.from_dict(selection_dict(model, r=max(k, n - 2), seed=1))
    try:
        adapter.top_k_updates(model.config, 1)
    except PipelineError as exc:
        assert str(exc).startswith("export.top_k:") and "\n" not in str(exc)
        pytest.skip(str(exc))
    export_pruned(model, adapter, selection, tmp_path / "m", progress=False, top_k=1)
    loaded = load(tmp_path / "m")
    assert adapter.top_k(loaded.config) == 1
    assert json.loads((tmp_path / "m" / "config.json").read_text())["pruning"]["static_top_k"] == {
        "top_k": 1, "original_top_k": k}
    x = torch.randn(30, loaded.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0))
    for i in adapter.moe_layer_indices(loaded):
        block = adapter.moe_block(adapter.decoder_layers(loaded)[i])
        with torch.no_grad():
            weights, idx = adapter.router_decisions(block, x)
            expected_w, expected_idx = adapter.route(block, adapter.router_logits(block, x), loaded.config)
        assert idx.shape[-1] == 1 and expected_idx.shape[-1] == 1
        assert torch.equal(idx.reshape(-1), expected_idx.reshape(-1))
        torch.testing.assert_close(weights.reshape(-1), expected_w.reshape(-1).float(), rtol=1e-5, atol=1e-6)
        if model_type == "mixtral":  # renormalises over the one expert left: weight 1
            torch.testing.assert_close(weights, torch.ones_like(weights))
        if model_type == "qwen2_moe":  # does not renormalise: the softmax probability itself
            assert bool((weights < 1).all())


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"top_k": 2}, "export.top_k: must be below the model's top_k=2 (got 2)"),
    ({"merge": "output"}, "export.merge: merging needs the cached calibration activations"),
    ({"merge": "bogus", "inputs": lambda i: None}, "export.merge: unknown method 'bogus'"),
])
def test_bad_merge_or_top_k_is_one_line_and_writes_nothing(tmp_path: Path, kwargs: dict, expected: str) -> None:
    model = tiny_model()
    adapter = get_adapter(model.config)
    selection = Selection.from_dict(selection_dict(model, r=6))
    with pytest.raises(PipelineError) as err:
        export_pruned(model, adapter, selection, tmp_path / "m", progress=False, merged_dir=tmp_path / "g", **kwargs)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    assert not (tmp_path / "m").exists() and not (tmp_path / "g").exists()
