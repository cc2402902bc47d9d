"""Fast candidate scoring (pipeline/search/scoring.py) against the straightforward reference loss."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models import get_adapter
from pipeline.search.reference import reference_losses
from pipeline.search.scoring import CandidateRouter, LayerScorer, TokenLayout, all_subsets
from pipeline.streaming import stream_layers
from tests.factory import TINY_CONFIGS, tiny_model


def first_moe_layer(model, seed: int = 0, samples: int = 4, seq_len: int = 12):
    """(adapter, block, layer index, x [N, L, d]) of the first MoE layer on random tokens."""
    adapter = get_adapter(model.config)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (samples, seq_len), generator=gen)
    for step in stream_layers(model, adapter, ids, batch_size=2, device=torch.device("cpu"), progress=False):
        if step.block is not None:
            x = step.moe_tokens().reshape(samples, seq_len, -1).clone()
            return adapter, step.block, step.index, x
    raise AssertionError("model has no MoE layer")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("r", [2, 4, 6])
def test_enumeration_pick_is_the_reference_argmin(seed: int, r: int) -> None:
    model = tiny_model("mixtral", seed=seed)
    adapter, block, layer, x = first_moe_layer(model, seed=seed)
    scorer = LayerScorer(adapter, block, model.config, x, tokens_per_batch=x.shape[1], token_chunk=20)
    kept, fast = scorer.score_subsets(r)
    assert kept.shape == (math.comb(8, r), r)
    ref = reference_losses(adapter, block, model.config, x, kept, tokens_per_batch=x.shape[1], layer_idx=layer)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-7)
    pick, best = int(fast.argmin()), int(ref.argmin())
    assert pick == best or math.isclose(float(ref[pick]), float(ref[best]), rel_tol=1e-7)


def test_keeping_every_expert_gives_zero_loss() -> None:
    model = tiny_model("mixtral", seed=3)
    adapter, block, layer, x = first_moe_layer(model, seed=3)
    everything = torch.arange(8).view(1, 8)
    ref = reference_losses(adapter, block, model.config, x, everything, tokens_per_batch=12, layer_idx=layer)
    assert float(ref[0]) == 0.0
    scorer = LayerScorer(adapter, block, model.config, x, tokens_per_batch=12, token_chunk=64)
    scorer.prepare()
    some = scorer.losses(all_subsets(8, 7))
    full = float(scorer.losses(everything)[0])
    assert 0.0 <= full <= 1e-6 * float(some.min())


@pytest.mark.parametrize(("tokens_per_batch", "token_chunk"), [(12, 5), (24, 24), (12, 1000), (48, 7), (36, 30)])
def test_chunking_does_not_change_losses(tokens_per_batch: int, token_chunk: int) -> None:
    model = tiny_model("mixtral", seed=4)
    adapter, block, layer, x = first_moe_layer(model, seed=4)
    ref_scorer = LayerScorer(adapter, block, model.config, x, tokens_per_batch=tokens_per_batch, token_chunk=10_000)
    _, ref = ref_scorer.score_subsets(5)
    scorer = LayerScorer(adapter, block, model.config, x, tokens_per_batch=tokens_per_batch, token_chunk=token_chunk)
    kept, fast = scorer.score_subsets(5)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-9)
    direct = reference_losses(adapter, block, model.config, x, kept[:6], tokens_per_batch=tokens_per_batch, layer_idx=layer)
    torch.testing.assert_close(fast[:6], direct, rtol=1e-5, atol=1e-7)


def test_layout_batches_cover_every_token_once() -> None:
    for total, tpb, chunk in [(48, 12, 5), (50, 12, 30), (7, 3, 100), (48, 48, 7)]:
        layout = TokenLayout(total, tpb, chunk)
        ranges = layout.chunks()
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        acc = torch.zeros(1, layout.num_batches, dtype=torch.float64)
        for start, end in ranges:
            layout.batch_sums(start, end, torch.arange(start, end, dtype=torch.float64).view(1, -1), acc)
        expected = [sum(range(b * tpb, min((b + 1) * tpb, total))) for b in range(layout.num_batches)]
        assert acc.view(-1).tolist() == expected


def test_dense_and_subset_passes_agree_and_subset_scorer_refuses_other_sizes() -> None:
    model = tiny_model("mixtral", seed=5)
    adapter, block, _, x = first_moe_layer(model, seed=5)
    sub = LayerScorer(adapter, block, model.config, x, tokens_per_batch=12, token_chunk=16)
    kept, fast = sub.score_subsets(3)
    dense = LayerScorer(adapter, block, model.config, x, tokens_per_batch=12, token_chunk=16)
    dense.prepare()
    torch.testing.assert_close(dense.losses(kept), fast, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sub.losses(kept[10:20]), fast[10:20], rtol=1e-12, atol=1e-13)
    assert sub.stats is not None and dense.stats is not None
    assert sub.stats.counts.tolist() == dense.stats.counts.tolist()
    assert int(sub.stats.counts.sum()) == x.shape[0] * x.shape[1] * 2
    for i in range(0, kept.shape[0], 7):  # a set's loss does not depend on the other sets scored with it
        assert float(dense.losses(kept[i : i + 1])[0]) == float(dense.losses(kept)[i])
        assert float(sub.losses(kept[i : i + 1])[0]) == float(fast[i])
    with pytest.raises(ValueError, match="3-subsets"):
        sub.losses(all_subsets(8, 4)[:2])


def test_spilled_cache_scores_like_memory(tmp_path) -> None:
    model = tiny_model("mixtral", seed=6)
    adapter, block, _, x = first_moe_layer(model, seed=6)
    memory = LayerScorer(adapter, block, model.config, x, tokens_per_batch=12, token_chunk=12)
    memory.prepare()
    spilled = LayerScorer(adapter, block, model.config, x, tokens_per_batch=12, token_chunk=12, spill_dir=tmp_path, cache_bytes=1)
    spilled.prepare()
    assert len(list(tmp_path.glob("gram_*.safetensors"))) == 4
    sets = all_subsets(8, 4)
    torch.testing.assert_close(spilled.losses(sets), memory.losses(sets), rtol=0, atol=0)
    spilled.close()
    assert not list(tmp_path.glob("gram_*"))


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_candidate_router_matches_adapter_route(model_type: str) -> None:
    model = tiny_model(model_type, seed=7)
    adapter, block, _, x = first_moe_layer(model, seed=7)
    n, k = adapter.block_num_experts(block), adapter.top_k(model.config)
    logits = adapter.router_logits(block, x.reshape(-1, x.shape[-1]))
    router = CandidateRouter(adapter, block, model.config)
    for m in range(max(k, n - 3), n + 1):
        kept = all_subsets(n, m)[:: max(1, math.comb(n, m) // 9)]
        weights, ids = router(logits, kept)
        assert weights.shape == ids.shape == (k, logits.shape[0], kept.shape[0])
        for c, row in enumerate(kept.tolist()):
            w_ref, i_ref = adapter.route(block, logits, model.config, row)
            assert torch.equal(ids[:, :, c].t(), i_ref)
            torch.testing.assert_close(weights[:, :, c].t(), w_ref.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_fast_loss_equals_pruned_block_output_for_every_family(model_type: str) -> None:
    model = tiny_model(model_type, seed=8)
    adapter, block, layer, x = first_moe_layer(model, seed=8)
    n, k = adapter.block_num_experts(block), adapter.top_k(model.config)
    r = max(k, n // 2)
    scorer = LayerScorer(adapter, block, model.config, x, tokens_per_batch=24, token_chunk=20)
    kept, fast = scorer.score_subsets(r)
    picks = kept[:: max(1, kept.shape[0] // 8)]
    ref = reference_losses(adapter, block, model.config, x, picks, tokens_per_batch=24, layer_idx=layer)
    torch.testing.assert_close(fast[:: max(1, kept.shape[0] // 8)], ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("renormalize", "scale"), [(True, 1.0), (False, 1.0), (False, 2.5), (True, 0.5)])
def test_fast_softmax_router_equals_the_rule_including_ties(renormalize: bool, scale: float) -> None:
    from pipeline.models.mixtral import MixtralAdapter
    from pipeline.models.routing import SoftmaxTopK

    class Rule(MixtralAdapter):
        model_types = ()

        def routing_rule(self, config):
            return SoftmaxTopK(top_k=self.top_k(config), renormalize=renormalize, scale=scale)

    model = tiny_model("mixtral", seed=9, top_k=3)
    adapter = Rule()
    block = adapter.moe_block(model.model.layers[0])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 8, generator=gen) * 3
    logits[:20, 5] = logits[:20, 2]  # exact ties
    logits[20:40, 7] = logits[20:40, 1] + 1e-7  # near ties
    logits[40:60] = 0.0  # every expert tied
    logits[60:80] *= 40.0  # far apart: float32 exp(l - max over all experts) underflows
    router = CandidateRouter(adapter, block, model.config)
    for m in (3, 5, 7, 8):
        kept = all_subsets(8, m)
        weights, ids = router(logits, kept)
        for c, row in enumerate(kept.tolist()):
            w_ref, i_ref = adapter.route(block, logits, model.config, row)
            assert torch.equal(ids[:, :, c].t(), i_ref)
            torch.testing.assert_close(weights[:, :, c].t(), w_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scoring_matches_cpu() -> None:
    model = tiny_model("mixtral", seed=10)
    adapter, block, layer, x = first_moe_layer(model, seed=10)
    cpu = LayerScorer(adapter, block, model.config, x, tokens_per_batch=12, token_chunk=20)
    kept, on_cpu = cpu.score_subsets(4)
    block_gpu = adapter.moe_block(model.to("cuda").model.layers[layer])
    gpu = LayerScorer(adapter, block_gpu, model.config, x, tokens_per_batch=12, token_chunk=20, device="cuda")
    kept_gpu, on_gpu = gpu.score_subsets(4)
    assert torch.equal(kept_gpu.cpu(), kept)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-5, atol=1e-8)
    assert int(on_gpu.argmin()) == int(on_cpu.argmin())
    gpu.prepare()
    torch.testing.assert_close(gpu.losses(kept[:9]), on_cpu[:9], rtol=1e-5, atol=1e-8)
    ref = reference_losses(adapter, block_gpu, model.config, x, kept[:9], tokens_per_batch=12, layer_idx=layer)
    torch.testing.assert_close(ref, on_cpu[:9], rtol=1e-4, atol=1e-7)
