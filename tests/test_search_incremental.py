"""Incremental scoring for greedy and beam search (pipeline/search/incremental.py) against full recomputation."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import SearchParams
from pipeline.models.routing import SigmoidBiasTopK, SoftmaxTopK, is_local, routes_children
from pipeline.search import registry
from pipeline.search.incremental import PREFETCH, LazyScorer
from pipeline.search.run import search_layer
from pipeline.search.scoring import LayerScorer
from pipeline.search.strategies import beam_search
from tests.factory import TINY_CONFIGS, tiny_model
from tests.test_search_scoring import first_moe_layer

#: One family per routing rule (softmax with/without renormalisation, sigmoid with groups and bias,
#: logit-biased sigmoid, top-k scores, top-k softmax, softmax + bias, sparsemixer, unit weights with
#: the adapter's own expert outputs, group-limited softmax); shared experts in several.
RULE_FAMILIES = [
    "mixtral", "qwen2_moe", "deepseek_v3", "kolibri1", "cohere2_moe", "gpt_oss", "ernie4_5_moe", "phimoe",
    "llama4_text", "deepseek_v2", "dots1",
]


def scorers(family: str, seed: int = 0, prefetch: int = PREFETCH, **overrides):
    model = tiny_model(family, seed=seed, **overrides)
    adapter, block, _, x = first_moe_layer(model, seed=seed)
    kw = dict(tokens_per_batch=12, token_chunk=20)
    dense = LayerScorer(adapter, block, model.config, x, **kw)
    dense.prepare()
    lazy = LazyScorer(adapter, block, model.config, x, prefetch=prefetch, **kw)
    lazy.prepare()
    return adapter, block, model.config, x, dense, lazy


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to floating-point tolerance (relative to the largest loss: dropping an unused expert costs ~0)."""
    return bool(((a - b).abs() <= 1e-7 * b.abs().max() + 1e-12).all())


def check_family(family: str) -> None:
    adapter, block, config, x, dense, lazy = scorers(family)
    n, k = dense.n, dense.k
    assert torch.equal(lazy.stats.counts, dense.stats.counts)
    # Outputs computed on different token subsets differ in float32 rounding (matmul blocking).
    assert torch.allclose(lazy.stats.reap_sum, dense.stats.reap_sum, rtol=1e-6)
    parent = list(range(n))
    while len(parent) > k:
        (kept, losses), = lazy.children([parent])
        assert kept.shape == (len(parent), len(parent) - 1)
        assert close(losses, dense.losses(kept)), family
        parent = kept[int(losses.argmin())].tolist()
    gen = torch.Generator().manual_seed(1)
    some = torch.stack([torch.randperm(n, generator=gen)[: k + 1].sort().values for _ in range(5)])
    assert close(lazy.losses(some), dense.losses(some)), family


@pytest.mark.parametrize("family", RULE_FAMILIES)
def test_children_losses_equal_a_full_recomputation(family: str) -> None:
    check_family(family)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(TINY_CONFIGS) - set(RULE_FAMILIES)))
def test_children_losses_equal_a_full_recomputation_every_family(family: str) -> None:
    check_family(family)


def test_rules_declare_locality() -> None:
    assert is_local(SoftmaxTopK(top_k=2, renormalize=True))
    assert not is_local(SoftmaxTopK(top_k=2, renormalize=False))  # the softmax denominator sees every expert
    assert is_local(SigmoidBiasTopK(top_k=2, n_group=1, topk_group=1, renormalize=True))
    assert not is_local(SigmoidBiasTopK(top_k=2, n_group=4, topk_group=2, renormalize=True))
    assert not is_local(object())


def test_outputs_are_computed_only_where_some_scored_set_routes() -> None:
    _, _, _, x, _, lazy = scorers("qwen3_moe", num_experts=16, top_k=4, prefetch=0)
    tokens = x.shape[0] * x.shape[1]
    assert lazy.expert_evals == tokens * lazy.k  # prepare: the full model's routing only
    lazy.children([list(range(16))])
    # Dropping one of a token's top-4 brings in its 5th expert: at most one new output per token.
    assert tokens * lazy.k < lazy.expert_evals <= tokens * (lazy.k + 1)
    assert bool(((lazy.slot_of >= 0).sum(1) == lazy.count).all())


def test_prefetched_outputs_serve_the_next_levels() -> None:
    _, _, _, x, _, lazy = scorers("qwen3_moe", num_experts=16, top_k=4, prefetch=2)
    tokens = x.shape[0] * x.shape[1]
    (kept, losses), = lazy.children([list(range(16))])
    assert lazy.expert_evals <= tokens * (lazy.k + 1 + 2)  # each token's top 4 + 1 + 2
    evals = lazy.expert_evals
    for _ in range(2):  # two levels down, every set routes within the first parent's top 7
        (kept, losses), = lazy.children([kept[int(losses.argmin())].tolist()])
        assert lazy.expert_evals == evals


@pytest.mark.parametrize(("seed", "r", "width"), [(0, 8, 4), (1, 5, 1), (2, 6, 2)])
def test_incremental_beam_picks_what_the_full_beam_picks(seed: int, r: int, width: int) -> None:
    _, _, _, _, dense, lazy = scorers("qwen3_moe", seed=seed, num_experts=16, top_k=4)
    full = beam_search(dense.losses, 16, r, width)
    fast = beam_search(lazy.losses, 16, r, width, expand=lazy.children)
    assert fast.kept == full.kept and fast.evaluated == full.evaluated
    assert torch.equal(fast.candidates, full.candidates)
    assert close(fast.losses, full.losses)
    assert lazy.expert_evals < 16 * lazy.layout.num_tokens  # never a dense pass


def test_search_layer_uses_incremental_scoring_for_beam_and_reports_progress() -> None:
    assert registry.get("beam").incremental and registry.get("greedy").incremental
    assert not registry.get("enumerate").incremental
    model = tiny_model("qwen3_moe", num_experts=16, top_k=4)
    adapter, block, layer, x = first_moe_layer(model)
    settings = SearchParams(r=8, strategy="beam", beam_width=2)
    counted: list[int] = []
    result = search_layer(adapter, block, model.config, x, layer, settings, seq_len=x.shape[1], progress=counted.append)
    planned = registry.planned_candidates("beam", 16, 8, settings) + len(settings.baselines)
    assert result.verified_loss is not None  # the pruned block's own forward agrees (search.verify)
    assert result.candidates_evaluated <= sum(counted) <= planned


def test_drop_one_routes_as_the_rule_on_each_child() -> None:
    rule = SigmoidBiasTopK(top_k=4, n_group=4, topk_group=2, renormalize=True, scale=2.5)
    gen = torch.Generator().manual_seed(0)
    logits, bias = torch.randn(64, 13, generator=gen) * 2, torch.randn(13, generator=gen) * 0.3
    routes = rule.drop_one(logits, bias)
    assert torch.equal(routes.tok[routes.use], torch.arange(64).view(-1, 1).expand(64, 13))
    for i in range(13):
        keep = torch.tensor([e for e in range(13) if e != i])
        w_ref, loc = rule(logits[:, keep], bias[keep])
        ours, order = routes.positions[routes.use[:, i]].sort(1)
        ref, ref_order = keep[loc].sort(1)
        assert torch.equal(ours, ref)
        assert torch.allclose(routes.weights[routes.use[:, i]].gather(1, order), w_ref.gather(1, ref_order), rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_limited_levels_are_incremental_and_pick_what_the_full_beam_picks(seed: int) -> None:
    # 32 experts in 4 groups (2 chosen), top-4: children of 29, 25, ..., 9 experts keep the groups.
    _, _, _, _, dense, lazy = scorers("deepseek_v3", seed=seed, num_experts=32, top_k=4, n_group=4, topk_group=2)
    assert routes_children(lazy.router.rule(28)) and not is_local(lazy.router.rule(28))
    parent = list(range(32))
    while len(parent) > 8:
        (kept, losses), = lazy.children([parent])
        assert close(losses, dense.losses(kept))
        parent = kept[int(losses.argmin())].tolist()
    full = beam_search(dense.losses, 32, 8, 2)
    fast = beam_search(lazy.losses, 32, 8, 2, expand=lazy.children)
    # Losses equal to rounding may order a level's near-ties apart, so only the picks are compared.
    assert fast.kept == full.kept
    assert close(fast.losses, dense.losses(fast.candidates))
