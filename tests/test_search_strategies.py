"""Search strategies and baselines (pipeline/search/{strategies,evolutionary,baselines}.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import get_args

import pytest
import torch

from pipeline.config import EvolutionaryParams, SearchParams, validate_r
from pipeline.errors import PipelineError
from pipeline.search import baselines, registry
from pipeline.search.evolutionary import evolutionary_search
from pipeline.search.registry import planned_candidates, resolve
from pipeline.search.scoring import LayerScorer, all_subsets
from pipeline.search.strategies import (
    beam_search,
    enumerate_all,
    greedy_search,
)
from tests.factory import tiny_model
from tests.test_search_scoring import first_moe_layer


def dense_scorer(seed: int, num_experts: int = 8, top_k: int = 2) -> tuple[LayerScorer, torch.Tensor]:
    model = tiny_model("mixtral", seed=seed, num_experts=num_experts, top_k=top_k)
    adapter, block, _, x = first_moe_layer(model, seed=seed)
    scorer = LayerScorer(adapter, block, model.config, x, tokens_per_batch=12, token_chunk=64)
    scorer.prepare()
    return scorer, x


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("r", [2, 3, 5])
def test_greedy_beam_and_evolution_never_beat_enumeration(seed: int, r: int) -> None:
    scorer, _ = dense_scorer(seed)
    kept = all_subsets(8, r)
    exact = enumerate_all(kept, scorer.losses(kept))
    assert exact.loss == float(scorer.losses(kept).min())
    for result in (
        greedy_search(scorer.losses, 8, r),
        beam_search(scorer.losses, 8, r, width=3),
        evolutionary_search(scorer.losses, 8, r, EvolutionaryParams(population=6, budget=20), seed=seed),
    ):
        assert len(result.kept) == r and result.kept == sorted(result.kept)
        assert result.loss >= exact.loss
        assert result.loss == float(scorer.losses(torch.tensor([result.kept]))[0])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_greedy_and_beam_match_enumeration_on_small_problems(seed: int) -> None:
    scorer, _ = dense_scorer(seed, num_experts=4, top_k=2)
    exact = enumerate_all(all_subsets(4, 3), scorer.losses(all_subsets(4, 3)))
    greedy = greedy_search(scorer.losses, 4, 3)  # one step: every 3-subset is scored
    assert (greedy.kept, greedy.loss, greedy.evaluated) == (exact.kept, exact.loss, 4)
    scorer6, _ = dense_scorer(seed, num_experts=6, top_k=2)
    exact6 = enumerate_all(all_subsets(6, 3), scorer6.losses(all_subsets(6, 3)))
    wide = beam_search(scorer6.losses, 6, 3, width=math.comb(6, 3))  # wide enough to keep every set
    assert (wide.kept, wide.loss) == (exact6.kept, exact6.loss)
    assert wide.candidates.shape[0] == math.comb(6, 3)


def test_candidate_counts_match_the_plan() -> None:
    scorer, _ = dense_scorer(0)
    greedy = greedy_search(scorer.losses, 8, 4)
    assert greedy.evaluated == planned_candidates("greedy", 8, 4, SearchParams()) == 8 + 7 + 6 + 5
    beam = beam_search(scorer.losses, 8, 4, width=3)
    assert beam.evaluated <= planned_candidates("beam", 8, 4, SearchParams(beam_width=3))
    evo = evolutionary_search(scorer.losses, 8, 4, EvolutionaryParams(population=5, budget=23), seed=1)
    assert evo.evaluated == 23 == planned_candidates("evolutionary", 8, 4, SearchParams(evolutionary=EvolutionaryParams(budget=23)))
    assert len({tuple(row) for row in evo.candidates.tolist()}) == 23
    assert planned_candidates("enumerate", 8, 4, SearchParams()) == 70


def test_evolution_is_seeded_and_finds_the_optimum_when_the_budget_covers_everything() -> None:
    scorer, _ = dense_scorer(1)
    settings = EvolutionaryParams(population=8, mutation=0.15, crossover=0.3, budget=30)
    a = evolutionary_search(scorer.losses, 8, 4, settings, seed=[0, 3])
    b = evolutionary_search(scorer.losses, 8, 4, settings, seed=[0, 3])
    assert (a.kept, a.loss) == (b.kept, b.loss) and torch.equal(a.candidates, b.candidates)
    full = evolutionary_search(scorer.losses, 8, 4, EvolutionaryParams(population=8, budget=500), seed=0)
    exact = enumerate_all(all_subsets(8, 4), scorer.losses(all_subsets(8, 4)))
    assert full.evaluated == 70 and (full.kept, full.loss) == (exact.kept, exact.loss)


def test_resolve_auto_and_validate_r() -> None:
    assert resolve("auto", 8, 4, 100) == "enumerate"
    assert resolve("auto", 8, 4, 69) == "beam"
    assert resolve("auto", 64, 32, 100_000) == "beam"
    assert resolve("greedy", 8, 4, 10**9) == "greedy"
    validate_r(2, 8, 2)
    for r, fragment in [(8, "below the model's 8 experts"), (9, "below"), (1, "at least the model's top_k=2"), (0, "positive")]:
        with pytest.raises(PipelineError, match=f"^search.r: .*{fragment}"):
            validate_r(r, 8, 2)


@torch.no_grad()
def test_baselines_follow_their_definitions() -> None:
    model = tiny_model("mixtral", seed=2)
    adapter, block, _, x = first_moe_layer(model, seed=2)
    scorer = LayerScorer(adapter, block, model.config, x, tokens_per_batch=12, token_chunk=20)
    scorer.prepare()
    stats = scorer.stats
    assert stats is not None
    tokens = x.reshape(-1, x.shape[-1])
    weights, ids = adapter.route(block, adapter.router_logits(block, tokens), model.config)
    counts = torch.bincount(ids.reshape(-1), minlength=8)
    assert stats.counts.tolist() == counts.tolist()
    order = sorted(range(8), key=lambda j: (-int(counts[j]), j))
    assert baselines.frequency(stats, 3) == sorted(order[:3])
    outputs = adapter.expert_outputs(block, tokens).double()
    reap = torch.zeros(8, dtype=torch.float64)
    for t in range(tokens.shape[0]):
        for slot in range(ids.shape[1]):
            j = int(ids[t, slot])
            reap[j] += float(weights[t, slot]) * float(outputs[t, j].norm())
    reap /= counts.clamp_min(1).double()
    torch.testing.assert_close(stats.reap_scores(), reap, rtol=1e-5, atol=1e-8)
    assert baselines.reap(stats, 5) == sorted(sorted(range(8), key=lambda j: (-float(reap[j]), j))[:5])
    assert baselines.random_experts(8, 4, seed=0, layer=1) == baselines.random_experts(8, 4, seed=0, layer=1)
    draws = {tuple(baselines.random_experts(8, 4, seed=0, layer=i)) for i in range(8)}
    assert len(draws) > 1 and all(len(set(d)) == 4 for d in draws)


def test_config_driver_and_docs_agree_with_the_strategy_registry() -> None:
    """search.strategy / search.baselines allow exactly the registry's names; each name has a function and a row in the docs."""
    assert get_args(SearchParams.model_fields["strategy"].annotation) == registry.STRATEGY_NAMES
    (baseline,) = get_args(SearchParams.model_fields["baselines"].annotation)
    assert get_args(baseline) == registry.BASELINE_NAMES
    assert SearchParams().baselines == list(registry.BASELINE_NAMES)
    for name in registry.STRATEGY_NAMES:
        assert SearchParams(strategy=name).strategy == name
    with pytest.raises(ValueError, match="strategy"):
        SearchParams(strategy="enumerat")
    with pytest.raises(ValueError, match="baselines"):
        SearchParams(baselines=["greedy"])
    for name, strategy in registry.STRATEGIES.items():
        assert callable(strategy.load()), name
        assert strategy.planned(8, 4, SearchParams()) >= 1
    assert registry.resolve("auto", 8, 4, 70) in registry.STRATEGIES
    with pytest.raises(PipelineError, match="unknown strategy"):
        registry.get("auto")
    docs = (Path(__file__).resolve().parents[1] / "docs" / "search.md").read_text()
    assert registry.strategies_table() in docs, "docs/search.md is stale: paste pipeline.search.registry.strategies_table()"
