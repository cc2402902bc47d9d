"""The search driver (pipeline/search/run.py) and its outputs (pipeline/search/report.py)."""

from __future__ import annotations

import csv
import json
from typing import Any

import pytest
import torch

from pipeline.config import EvolutionaryParams, SearchParams
from pipeline.errors import PipelineError
from pipeline.io import dumps_json
from pipeline.models import get_adapter
from pipeline.models.mixtral import MixtralAdapter
from pipeline.models.routing import SoftmaxTopK
from pipeline.search import registry, report
from pipeline.search.run import LayerResult, run_layerwise, run_progressive, search_layer
from pipeline.streaming import stream_layers
from tests.factory import tiny_model

SAMPLES, SEQ_LEN = 4, 10


def calibration_ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def layer_inputs(model: Any, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """The original model's MoE inputs ``[N, L, d]`` per MoE layer (what the activations stage caches)."""
    adapter = get_adapter(model.config)
    out = {}
    for step in stream_layers(model, adapter, ids, batch_size=2, device=torch.device("cpu"), progress=False):
        if step.block is not None:
            out[step.index] = step.moe_tokens().reshape(ids.shape[0], ids.shape[1], -1).clone()
    return out


def layerwise(model: Any, settings: SearchParams, ids: torch.Tensor, **kw: Any) -> list[LayerResult]:
    inputs = layer_inputs(model, ids)
    return run_layerwise(model, get_adapter(model.config), model.config, sorted(inputs), inputs.__getitem__, settings, **kw)


def progressive(model: Any, settings: SearchParams, ids: torch.Tensor, **kw: Any) -> list[LayerResult]:
    return run_progressive(model, get_adapter(model.config), model.config, ids, settings, batch_size=2, **kw)


def selection_text(results: list[LayerResult], settings: SearchParams) -> str:
    return dumps_json(report.selection(results, settings, calibration="c", model_fingerprint="f", num_experts=8, top_k=2))


@pytest.mark.parametrize("seed", [0, 1])
def test_enumeration_is_verified_and_never_worse_than_a_baseline(seed: int) -> None:
    model = tiny_model("mixtral", seed=seed, layers=3)
    settings = SearchParams(r=4, strategy="auto", verify=True, seed=seed)
    results = layerwise(model, settings, calibration_ids(320, seed))
    assert [r.layer for r in results] == [0, 1, 2]
    for res in results:
        assert res.strategy == "enumerate" and res.candidates_evaluated == 70 == res.losses.numel()
        assert res.kept == sorted(res.kept) and len(res.kept) == 4
        assert res.loss == float(res.losses.min())
        assert set(res.baselines) == {"frequency", "random", "reap"}
        for b in res.baselines.values():
            assert res.loss <= b["loss"]
        assert res.verified_loss == pytest.approx(res.loss, rel=1e-5)
        assert sum(res.usage) == SAMPLES * SEQ_LEN * 2


def test_same_seed_gives_an_identical_selection() -> None:
    ids = calibration_ids(320, 1)
    evolution = EvolutionaryParams(population=4, budget=12)
    settings = SearchParams(r=3, strategy="evolutionary", seed=5, verify=False, evolutionary=evolution)
    first = selection_text(layerwise(tiny_model("mixtral", seed=2), settings, ids), settings)
    second = selection_text(layerwise(tiny_model("mixtral", seed=2), settings, ids), settings)
    assert first == second
    assert json.loads(first)["layers"][0]["candidates_evaluated"] == 12


@pytest.mark.parametrize("strategy", list(registry.STRATEGIES))
def test_every_strategy_runs_through_the_driver(strategy: str) -> None:
    settings = SearchParams(r=4, strategy=strategy, beam_width=2, verify=True)
    res = layerwise(tiny_model("mixtral", seed=3, layers=1), settings, calibration_ids(320))[0]
    assert res.strategy == strategy and len(res.kept) == 4
    assert 1 <= res.candidates_evaluated <= registry.planned_candidates(strategy, 8, 4, settings)
    if strategy in res.baselines:
        assert res.baselines[strategy] == {"kept": res.kept, "loss": res.loss}
        assert res.candidates_evaluated == 1


def test_progressive_agrees_with_layerwise_on_layer_zero_and_prunes_as_it_goes() -> None:
    ids = calibration_ids(320, 4)
    settings = SearchParams(r=4, verify=True)
    flat = layerwise(tiny_model("mixtral", seed=4, layers=3), settings, ids)
    model = tiny_model("mixtral", seed=4, layers=3)
    prog = progressive(model, settings, ids)
    assert (prog[0].kept, prog[0].loss) == (flat[0].kept, flat[0].loss)
    assert torch.equal(prog[0].losses, flat[0].losses)
    assert prog[1].loss != flat[1].loss  # layer 1 saw the output of the pruned layer 0
    adapter = get_adapter(model.config)
    for i in adapter.moe_layer_indices(model):
        assert adapter.block_num_experts(adapter.moe_block(adapter.decoder_layers(model)[i])) == 4


class _Stop(Exception):
    pass


@pytest.mark.parametrize("mode", ["layerwise", "progressive"])
def test_resume_after_a_crash_gives_identical_results(tmp_path, mode: str) -> None:
    ids = calibration_ids(320, 6)
    settings = SearchParams(r=5, strategy="beam", beam_width=2, mode=mode, verify=False)
    runner = layerwise if mode == "layerwise" else progressive
    clean = runner(tiny_model("mixtral", seed=6, layers=3), settings, ids, work_dir=tmp_path / "a")
    seen: list[tuple[int, bool]] = []

    def crash_after_first(result: LayerResult, resumed: bool) -> None:
        seen.append((result.layer, resumed))
        if len(seen) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        runner(tiny_model("mixtral", seed=6, layers=3), settings, ids, work_dir=tmp_path / "b", on_layer=crash_after_first)
    assert sorted(p.name for p in (tmp_path / "b").glob("layer_*.json")) == ["layer_000.json", "layer_001.json"]
    seen.clear()
    resumed = runner(
        tiny_model("mixtral", seed=6, layers=3), settings, ids, work_dir=tmp_path / "b",
        on_layer=lambda result, was_resumed: seen.append((result.layer, was_resumed)),
    )
    assert seen == [(0, True), (1, True), (2, False)]
    assert selection_text(resumed, settings) == selection_text(clean, settings)
    for a, b in zip(clean, resumed, strict=True):
        assert torch.equal(a.candidates, b.candidates) and torch.equal(a.losses, b.losses)


def test_verify_rejects_an_adapter_whose_routing_differs_from_the_model() -> None:
    class NotRenormalised(MixtralAdapter):
        model_types = ()

        def routing_rule(self, config: Any) -> SoftmaxTopK:
            return SoftmaxTopK(top_k=self.top_k(config), renormalize=False)

    model = tiny_model("mixtral", seed=7, layers=1)
    x = layer_inputs(model, calibration_ids(320))[0]
    block = get_adapter(model.config).moe_block(model.model.layers[0])
    settings = SearchParams(r=4, verify=True)
    with pytest.raises(PipelineError, match="^search.verify: layer 0: the fast loss"):
        search_layer(NotRenormalised(), block, model.config, x, 0, settings, seq_len=SEQ_LEN)
    search_layer(NotRenormalised(), block, model.config, x, 0, settings.model_copy(update={"verify": False}), seq_len=SEQ_LEN)


@pytest.mark.parametrize(("r", "fragment"), [(8, "below the model's 8"), (1, "top_k=2"), (0, "positive"), (-2, "positive")])
def test_bad_r_is_one_clear_error(r: int, fragment: str) -> None:
    model = tiny_model("mixtral", seed=0, layers=1)
    x = torch.zeros(2, 3, model.config.hidden_size)
    block = get_adapter(model.config).moe_block(model.model.layers[0])
    with pytest.raises(PipelineError, match=f"^search.r: .*{fragment}"):
        search_layer(get_adapter(model.config), block, model.config, x, 0, SearchParams().model_copy(update={"r": r}), seq_len=3)


def test_report_tables_plots_and_metrics(tmp_path) -> None:
    model = tiny_model("mixtral", seed=8, layers=2)
    ids = calibration_ids(320, 8)
    settings = SearchParams(r=6, verify=False)
    results = layerwise(model, settings, ids)
    doc = report.selection(results, settings, calibration="general", model_fingerprint="abc", num_experts=8, top_k=2)
    assert doc["strategy"] == "enumerate" and doc["requested_strategy"] == "auto"
    assert [layer["layer"] for layer in doc["layers"]] == [0, 1]
    assert set(doc["layers"][0]) == {"layer", "kept", "loss", "candidates_evaluated", "baselines"}
    report.write_tables(tmp_path / "tables", results)
    with open(tmp_path / "tables" / "candidates.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 28
    chosen = [row for row in rows if row["chosen"] == "1"]
    assert [row["rank"] for row in chosen] == ["1", "1"]
    assert [float(row["loss"]) for row in chosen] == [r.loss for r in results]
    with open(tmp_path / "tables" / "baselines.csv") as fh:
        base = list(csv.DictReader(fh))
    assert {row["method"] for row in base} == {"enumerate", "frequency", "random", "reap"}
    assert all(float(row["loss_vs_chosen"]) >= 1.0 for row in base)
    usage = {0: [1] * 8, 1: [0, 2, 0, 2, 0, 2, 0, 2]}
    files = report.write_plots(tmp_path / "plots", results, usage, search_set="general", strategy="enumerate", r=6, n=8)
    names = sorted(p.relative_to(tmp_path / "plots").as_posix() for p in files)
    assert names == sorted([
        "data/loss_candidates.json", "data/loss_chosen.json", "data/loss_frequency.json", "data/loss_random.json",
        "data/loss_reap.json", "data/usage.json", "loss_distribution.png", "usage.png",
    ])
    points = json.loads((tmp_path / "plots" / "data" / "loss_candidates.json").read_text())
    assert len(points) == 56 and {p["layer"] for p in points} == {0, 1}
    shares = json.loads((tmp_path / "plots" / "data" / "usage.json").read_text())
    assert [s["share"] for s in shares if s["layer"] == 1] == [0, 0.25, 0, 0.25, 0, 0.25, 0, 0.25]
    doc_metrics, flat = report.metrics(results, 1.5)
    assert doc_metrics["loss"] == pytest.approx(sum(r.loss for r in results))
    assert flat["layer_001.loss_reap"] == results[1].baselines["reap"]["loss"]


def test_verify_accepts_a_near_zero_loss_up_to_rounding_of_the_outputs() -> None:
    """Dropped experts that no token routes to: the loss is zero up to rounding, and the fast and
    the direct value differ by float32 rounding of the outputs, not of the loss (seen on the
    embedded model calibrated on arith, where two experts of a layer are almost never routed)."""
    model = tiny_model("mixtral", seed=3, layers=1)
    adapter = get_adapter(model.config)
    block = adapter.moe_block(model.model.layers[0])
    x = layer_inputs(model, calibration_ids(320, 3))[0].clone()
    with torch.no_grad():
        x[..., 0] = 8.0  # one constant feature that pushes experts 6 and 7 to the bottom of every ranking
        block.gate.weight[:, 0] = 0.0
        block.gate.weight[6:, 0] = -4.0
    res = search_layer(adapter, block, model.config, x, 0, SearchParams(r=6, strategy="enumerate", verify=True), seq_len=SEQ_LEN)
    assert res.kept == [0, 1, 2, 3, 4, 5]
    output_norm = float(torch.linalg.vector_norm(adapter.block_output(block, x.reshape(-1, x.shape[-1])).double()))
    assert res.loss < 1e-5 * output_norm and res.verified_loss < 1e-5 * output_norm
