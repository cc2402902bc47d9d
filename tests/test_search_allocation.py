"""Global expert budgets (pipeline/search/allocation.py): the exact split and the search's loss curves."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from pipeline.config import SearchParams
from pipeline.errors import PipelineError
from pipeline.export import Selection, validate_selection
from pipeline.search import report
from pipeline.search.allocation import allocate, split_budget
from pipeline.search.scoring import all_subsets
from tests.factory import tiny_model
from tests.test_search_run import calibration_ids, layer_inputs, layerwise, selection_text


def brute_force(costs: list[dict[int, float]], total: int) -> float:
    values = [
        sum(c[s] for c, s in zip(costs, sizes, strict=True))
        for sizes in itertools.product(*[sorted(c) for c in costs])
        if sum(sizes) == total
    ]
    return min(values)


@pytest.mark.parametrize("seed", range(40))
def test_split_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    layers, k, n = rng.randint(1, 5), rng.randint(1, 3), rng.randint(4, 8)
    costs = []
    for _ in range(layers):
        # Decreasing in r, as loss curves are, but with random steps; sometimes flat (ties).
        values = sorted((round(rng.random(), 1) for _ in range(n - k)), reverse=True) + [0.0]
        costs.append(dict(zip(range(k, n + 1), values, strict=True)))
    total = rng.randint(k * layers, n * layers)
    sizes = split_budget(costs, total)
    assert sum(sizes) == total and all(k <= s <= n for s in sizes)
    assert sum(c[s] for c, s in zip(costs, sizes, strict=True)) == pytest.approx(brute_force(costs, total), abs=1e-12)
    assert split_budget(costs, total) == sizes  # deterministic


def test_split_gives_experts_to_the_layer_that_needs_them() -> None:
    cheap = {2: 0.01, 3: 0.005, 4: 0.0}
    costly = {2: 0.9, 3: 0.3, 4: 0.0}
    assert split_budget([cheap, costly], 6) == [2, 4]
    assert split_budget([costly, cheap, costly], 9) == [3, 2, 4] or split_budget([costly, cheap, costly], 9) == [4, 2, 3]


def test_split_outside_the_feasible_range_is_one_line() -> None:
    with pytest.raises(PipelineError, match="budget of 9 experts cannot be split"):
        split_budget([{2: 1.0, 4: 0.0}, {2: 1.0, 4: 0.0}], 9)


@pytest.mark.parametrize("strategy", ["enumerate", "greedy", "beam"])
def test_global_search_reports_curves_and_splits_the_budget(strategy: str) -> None:
    ids = calibration_ids(320, 0)
    uniform = SearchParams(r=4, strategy=strategy, verify=False)
    glob = SearchParams(r=4, strategy=strategy, verify=False, allocation="global")
    plain = layerwise(tiny_model("mixtral", layers=3), uniform, ids)
    curved = layerwise(tiny_model("mixtral", layers=3), glob, ids)
    model = tiny_model("mixtral", layers=3)
    inputs = layer_inputs(model, ids)
    for a, b in zip(plain, curved, strict=True):
        # The size-r result is the uniform search's, unchanged.
        assert (a.kept, a.loss, a.candidates_evaluated) == (b.kept, b.loss, b.candidates_evaluated)
        assert torch.equal(a.candidates, b.candidates) and torch.equal(a.losses, b.losses)
        assert [p["r"] for p in b.curve] == list(range(2, 9))
        assert b.curve[-1] == {"r": 8, "kept": list(range(8)), "loss": 0.0}
        block = model.model.layers[a.layer].mlp
        with torch.no_grad():
            norm = sum(float(torch.linalg.vector_norm(block(seq[None]).double())) for seq in inputs[a.layer])
        assert b.output_norm == pytest.approx(norm, rel=1e-5)  # sum over batches (one sequence each) of ||Z_b||_F
        if strategy == "enumerate":  # exact: the curve is the best loss at each size, so it never rises
            losses = [p["loss"] for p in b.curve]
            assert all(x >= y - 1e-9 for x, y in zip(losses, losses[1:]))
    allocated = allocate(curved, 4)
    sizes = [len(res.kept) for res in allocated]
    assert sum(sizes) == 12 and all(2 <= s <= 8 for s in sizes)
    relative = sum(res.loss / res.output_norm for res in allocated)
    assert relative <= sum(a.loss / b.output_norm for a, b in zip(plain, curved, strict=True)) + 1e-12  # uniform: one split
    for res, before in zip(allocated, curved, strict=True):
        assert res.baselines["uniform"] == {"kept": before.kept, "loss": before.loss}
    doc = report.selection(allocated, glob, calibration="c", model_fingerprint="f", num_experts=8, top_k=2)
    assert doc["allocation"] == "global" and doc["total_experts"] == 12
    assert [e["r"] for e in doc["layers"]] == sizes
    selection = Selection.from_dict(json.loads(json.dumps(doc)))
    validate_selection(selection, moe_layers=[0, 1, 2], num_experts=8, top_k=2, fingerprint="f")
    assert selection.counts == dict(zip([0, 1, 2], sizes, strict=True))


def test_enumerated_curve_is_the_exact_minimum_at_each_size() -> None:
    ids = calibration_ids(320, 3)
    results = layerwise(tiny_model("mixtral", seed=3), SearchParams(r=3, strategy="enumerate", verify=False,
                                                                     allocation="global"), ids)
    from pipeline.models import get_adapter
    from pipeline.search.scoring import LayerScorer

    model = tiny_model("mixtral", seed=3)
    adapter = get_adapter(model.config)
    inputs = layer_inputs(model, ids)
    res = results[0]
    block = adapter.moe_block(adapter.decoder_layers(model)[res.layer])
    scorer = LayerScorer(adapter, block, model.config, inputs[res.layer], tokens_per_batch=ids.shape[1], token_chunk=8192)
    for point in res.curve[:-1]:
        _, losses = scorer.score_subsets(point["r"])
        assert point["loss"] == float(losses.min())
        assert len(point["kept"]) == point["r"] and all_subsets(8, point["r"]).shape[0] == losses.numel()


def test_uniform_selection_is_unchanged_by_the_feature() -> None:
    ids = calibration_ids(320, 1)
    settings = SearchParams(r=4, strategy="auto", verify=False)
    text = selection_text(layerwise(tiny_model("mixtral", seed=1), settings, ids), settings)
    assert "allocation" not in text and "curve" not in text and '"r": 4' in text


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"mode": "progressive"}, "needs mode layerwise"),
        ({"strategy": "evolutionary"}, "scores every size"),
        ({"strategy": "reap"}, "scores every size"),
    ],
)
def test_global_allocation_rejects_settings_it_cannot_use(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        SearchParams(r=4, allocation="global", **kwargs)


def test_selection_with_a_wrong_total_is_rejected() -> None:
    layers = [{"layer": 0, "kept": [0, 1, 2]}, {"layer": 1, "kept": [0, 1, 2, 3, 4, 5]}]
    data = {"r": 4, "num_experts": 8, "top_k": 2, "allocation": "global", "layers": layers}
    with pytest.raises(PipelineError, match="keep 9 experts in all, expected r x layers = 8"):
        validate_selection(Selection.from_dict(data), moe_layers=[0, 1], num_experts=8, top_k=2)
    layers[1]["kept"] = [0, 1, 2, 3, 4]
    validate_selection(Selection.from_dict(data), moe_layers=[0, 1], num_experts=8, top_k=2)
    with pytest.raises(PipelineError, match="keeps 3 experts, expected r=4"):
        validate_selection(Selection.from_dict({**data, "allocation": "uniform"}), moe_layers=[0, 1], num_experts=8, top_k=2)
