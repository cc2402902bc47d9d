"""Dynamic expert skipping: the rule, thresholds, dispatch counting and the skip-enabled checkpoint."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from pipeline import skipping
from pipeline.errors import PipelineError
from pipeline.export import Selection, export_pruned
from pipeline.models import get_adapter
from tests.factory import tiny_model

N_EXPERTS, HIDDEN, INTER = 8, 32, 48


def calibration_ids(n: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(seed))


def random_routing(t: int, k: int, n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(t, n, generator=g) * 2, dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    perm = torch.stack([torch.randperm(k, generator=g) for _ in range(t)])  # routers need not sort
    return w.gather(1, perm), idx.gather(1, perm)


def naive_rule(w: list[float], beta: float, share_form: bool = False) -> int:
    """Experts kept by one token, straight from the definition (ratio form, or method.md's tail share)."""
    s = sorted(w, reverse=True)
    k = len(s)
    for i in range(1, k):
        head, tail = sum(s[:i]), sum(s[i:])
        if share_form:  # method.md: tail share below beta / (1 + beta)
            share_beta = beta / (1 + beta) if math.isfinite(beta) else 1.0
            if tail / sum(s) < share_beta:
                return i
        elif tail / head < beta:
            return i
    return k


# -- the rule ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("beta", [0.0, 0.05, 0.3, 0.7, 1.5, math.inf])
def test_rule_matches_definition_and_tail_share_form(k: int, beta: float) -> None:
    w, idx = random_routing(300, k, seed=k)
    counts = skipping.kept_counts(w, beta)
    for t in range(0, 300, 7):
        token = w[t].tolist()
        assert counts[t] == naive_rule(token, beta) == naive_rule(token, beta, share_form=True)
    new_w, new_idx = skipping.skip_routing(w, idx, beta, sentinel=N_EXPERTS)
    kept = new_idx < N_EXPERTS
    assert torch.equal(kept.sum(-1), counts)
    # the kept experts are the highest-weighted ones, and they carry the original total weight
    assert torch.all(torch.where(kept, w, math.inf).amin(-1) >= torch.where(kept, -1.0, w).amax(-1))
    torch.testing.assert_close(new_w.sum(-1), w.sum(-1))
    assert torch.all(new_w[~kept] == 0)
    assert torch.equal(new_idx[kept], idx[kept])


@pytest.mark.parametrize("k", [2, 3])
def test_threshold_zero_is_identity_and_infinity_is_top1(k: int) -> None:
    w, idx = random_routing(200, k, seed=5)
    same_w, same_idx = skipping.skip_routing(w, idx, 0.0, sentinel=N_EXPERTS)
    assert torch.equal(same_w, w) and torch.equal(same_idx, idx)
    top_w, top_idx = skipping.skip_routing(w, idx, math.inf, sentinel=N_EXPERTS)
    best = w.argmax(-1)
    assert torch.equal(top_idx.gather(1, best[:, None])[:, 0], idx.gather(1, best[:, None])[:, 0])
    assert torch.all((top_idx < N_EXPERTS).sum(-1) == 1)
    torch.testing.assert_close(top_w.sum(-1), w.sum(-1))


def test_unskipped_tokens_keep_weights_bit_for_bit() -> None:
    w, idx = random_routing(500, 2, seed=7)
    beta = float(skipping.calibration_statistic(w).median())
    new_w, new_idx = skipping.skip_routing(w, idx, beta, sentinel=N_EXPERTS)
    full = (new_idx < N_EXPERTS).all(-1)
    assert 0 < int(full.sum()) < 500
    assert torch.equal(new_w[full], w[full]) and torch.equal(new_idx[full], idx[full])


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("q", [0.25, 0.5, 0.8])
def test_quantile_threshold_skips_that_fraction(k: int, q: float) -> None:
    """A token skips at least one expert exactly when rho < beta, so the quantile sets the fraction."""
    w, _ = random_routing(2000, k, seed=11)
    rho = skipping.calibration_statistic(w)
    if k == 2:
        torch.testing.assert_close(rho, w.amin(-1) / w.amax(-1))
    beta = skipping.threshold(rho, q)
    skipped = skipping.kept_counts(w, beta) < k
    assert torch.equal(skipped, rho < beta)
    assert abs(float(skipped.float().mean()) - q) <= 1 / 2000


# -- on a model -------------------------------------------------------------------------------------
class CountExpertRows(TorchFunctionMode):
    """Counts token rows that really go through an expert's up-projection (``linear`` with a [2f, d] weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and tuple(args[1].shape) == (2 * INTER, HIDDEN):
            self.rows += args[0].shape[0]
        return func(*args, **kwargs)


@torch.no_grad()
def test_median_threshold_skips_half_of_second_experts_and_dispatch_drops() -> None:
    model = tiny_model()
    adapter = get_adapter(model.config)
    ids = calibration_ids()
    tokens = ids.numel()
    thresholds = skipping.calibrate_thresholds(model, adapter, ids, quantile=0.5, batch_size=4, progress=False)
    assert sorted(thresholds) == [0, 1] and all(0 < b < 1 for b in thresholds.values())

    model.set_experts_implementation("eager")
    with skipping.count_dispatch(model) as plain, CountExpertRows() as rows_plain:
        model(input_ids=ids)
    assert plain.stats()["expert_evals"] == rows_plain.rows == 2 * 2 * tokens

    with skipping.enable(model, thresholds) as handle, CountExpertRows() as rows:
        model(input_ids=ids)
    stats = handle.stats()
    assert stats["expert_evals"] == rows.rows  # counted dispatch == experts actually computed
    assert stats["tokens"] == 2 * tokens
    assert abs(stats["layers"]["0"]["second_expert_skipped_fraction"] - 0.5) <= 1 / tokens  # exact on layer 0's inputs
    assert abs(stats["second_expert_skipped_fraction"] - 0.5) <= 0.05
    skipped_evals = 2 * 2 * tokens - rows.rows
    assert skipped_evals == round(stats["second_expert_skipped_fraction"] * 2 * tokens)
    assert stats["skipped_fraction"] == pytest.approx(skipped_evals / (2 * 2 * tokens))
    assert stats["evals_per_token"] == pytest.approx(rows.rows / (2 * tokens))
    handle.reset()
    assert handle.stats()["expert_evals"] == 0


@torch.no_grad()
def test_threshold_zero_changes_nothing_and_remove_restores() -> None:
    model = tiny_model()
    ids = calibration_ids(4, 16)
    default = model(input_ids=ids).logits
    implementation = model.config._experts_implementation
    with skipping.enable(model, {0: 0.0, 1: 0.0}) as handle:
        assert model.config._experts_implementation == implementation  # nothing to skip: kernel unchanged
        out = model(input_ids=ids).logits
    assert torch.equal(out, default)
    assert handle.stats()["skipped_fraction"] == 0.0 and handle.stats()["evals_per_token"] == 2.0

    model.set_experts_implementation("eager")
    eager = model(input_ids=ids).logits
    model.set_experts_implementation(implementation)
    with skipping.enable(model, {0: 0.0, 1: 1e-12}) as handle:  # a positive threshold needs the eager loop
        assert model.config._experts_implementation == "eager"
        out = model(input_ids=ids).logits
    assert torch.equal(out, eager)
    assert handle.stats()["skipped_fraction"] == 0.0
    assert model.config._experts_implementation == implementation
    assert torch.equal(model(input_ids=ids).logits, default)
    adapter = get_adapter(model.config)
    for i in adapter.moe_layer_indices(model):
        block = adapter.moe_block(adapter.decoder_layers(model)[i])
        assert not block.gate._forward_hooks and not block.experts._forward_pre_hooks


@torch.no_grad()
def test_always_skip_equals_top1_routing() -> None:
    model = tiny_model()
    ids = calibration_ids(4, 16)
    config = copy.deepcopy(model.config)
    config.num_experts_per_tok = 1
    from transformers import AutoModelForCausalLM

    top1 = AutoModelForCausalLM.from_config(config).eval()
    top1.load_state_dict(model.state_dict())
    top1.set_experts_implementation("eager")
    with skipping.enable(model, [math.inf, math.inf]) as handle:
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, top1(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert handle.stats()["evals_per_token"] == 1.0
    assert handle.stats()["second_expert_skipped_fraction"] == 1.0


@torch.no_grad()
def test_top3_threshold_skips_last_expert_on_calibration_tokens() -> None:
    model = tiny_model(top_k=3)
    adapter = get_adapter(model.config)
    ids = calibration_ids()
    thresholds = skipping.calibrate_thresholds(model, adapter, ids, quantile=0.5, batch_size=4, progress=False)
    stats = skipping.measure_skipping(model, adapter, ids, thresholds, batch_size=4, progress=False)
    assert abs(stats["layers"]["0"]["last_expert_skipped_fraction"] - 0.5) <= 1 / ids.numel()
    assert stats["second_expert_skipped_fraction"] <= stats["last_expert_skipped_fraction"]
    assert 2.0 <= stats["evals_per_token"] < 3.0


def test_wrong_thresholds_are_one_line_errors(tmp_path: Path) -> None:
    model = tiny_model()
    cases = [
        ({0: 0.5}, r"has thresholds for 1 layers \[0\], the model's 2 MoE layers are \[0, 1\]"),
        ([0.5, 0.5, 0.5], r"has 3 thresholds, the model has 2 MoE layers"),
        ({0: 0.5, 1: -1.0}, r"layer 1 must be >= 0"),
        ({0: 0.5, 1: float("nan")}, r"layer 1 must be >= 0"),
        (None, r"config has no expert_skip_thresholds"),
    ]
    for thresholds, message in cases:
        with pytest.raises(PipelineError, match=message) as err:
            skipping.enable(model, thresholds)
        assert "\n" not in str(err.value)
    assert model.config._experts_implementation != "eager"
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"pruned": {"0": 0.4, "1": 0.4, "2": 0.4}, "original": {"0": 0.4}}))
    with pytest.raises(PipelineError, match=r"has thresholds for 3 layers"):
        skipping.enable(model, skipping.load_thresholds(path, "pruned"))
    with pytest.raises(PipelineError, match=r"has no 'other' thresholds"):
        skipping.load_thresholds(path, "other")


# -- the skip-enabled checkpoint -----------------------------------------------------------------------
@torch.no_grad()
def test_skip_checkpoint_loads_with_plain_transformers_and_skips(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    adapter = get_adapter(model.config)
    selection = Selection.from_dict(
        {
            "r": 6,
            "num_experts": 8,
            "top_k": 2,
            "layers": [{"layer": 0, "kept": [0, 1, 2, 4, 5, 7]}, {"layer": 1, "kept": [1, 2, 3, 4, 5, 6]}],
        }
    )
    export_pruned(model, adapter, selection, tmp_path / "export", progress=False)
    ids = calibration_ids()
    thresholds = skipping.calibrate_thresholds(model, adapter, ids, quantile=0.5, batch_size=4, progress=False)

    with pytest.raises(PipelineError, match=r"thresholds: 1 layers"):
        skipping.write_skip_checkpoint(tmp_path / "export", tmp_path / "skip", {0: 0.5})
    assert not (tmp_path / "skip").exists()

    skipping.write_skip_checkpoint(tmp_path / "export", tmp_path / "skip", thresholds)
    for shard in (tmp_path / "export").glob("*.safetensors"):
        linked = tmp_path / "skip" / shard.name
        assert linked.is_file() and (linked.stat().st_ino == shard.stat().st_ino or linked.read_bytes() == shard.read_bytes())
    assert "expert_skip_thresholds" not in json.loads((tmp_path / "export" / "config.json").read_text())
    assert "Dynamic expert skipping" in (tmp_path / "skip" / "README.md").read_text()

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "skip")).eval()
    assert {int(k): v for k, v in loaded.config.expert_skip_thresholds.items()} == pytest.approx(thresholds)
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with skipping.enable(loaded) as handle:
        loaded(input_ids=ids)
    assert abs(handle.stats()["second_expert_skipped_fraction"] - 0.5) <= 0.05
    assert handle.stats()["evals_per_token"] < 1.6


# -- the run-time paths against a reference ---------------------------------------------------------
def reference_skip(weights: torch.Tensor, indices: torch.Tensor, beta: float, sentinel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule token by token, straight from its definition, in float32 (the reference for every fast path)."""
    tiny = torch.finfo(torch.float32).tiny
    k = weights.shape[-1]
    new_w, new_idx = weights.clone(), indices.clone()
    for t in range(weights.shape[0]):
        w = weights[t].float()
        order = sorted(range(k), key=lambda j: -float(w[j]))  # descending; the first slot first on ties
        s = w[order]
        head = [s[0]]  # head(i), summed from the largest weight; tail(i) from the smallest
        tail = [s[k - 1]]
        for j in range(1, k - 1):
            head.append(head[-1] + s[j])
            tail.insert(0, tail[0] + s[k - 1 - j])
        kept = next((i for i in range(1, k) if bool(tail[i - 1] / head[i - 1].clamp_min(tiny) < beta)), k)
        if kept == k:
            continue
        scale = w.sum() / s[:kept].sum().clamp_min(tiny)
        for rank, j in enumerate(order):
            new_w[t, j] = (w[j] * scale).to(weights.dtype) if rank < kept else 0
            if rank >= kept:
                new_idx[t, j] = sentinel
    return new_w, new_idx


def awkward_routing(t: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random unsorted routing with tied, all-zero and one-hot rows."""
    w, idx = random_routing(t, k, seed=seed)
    w[0] = 0.0
    w[1] = 1.0 / k
    w[2, 1:] = 0.0
    w[3, 1] = w[3, 0]
    return w, idx


@pytest.mark.parametrize("k", [2, 3, 4])
def test_every_path_matches_the_reference(k: int) -> None:
    w, idx = awkward_routing(120, k, seed=20 + k)
    rho = skipping.calibration_statistic(w[4:])
    edge = float(rho[0])  # token 4's float32 ratio: not below itself, below the next float32 up
    above = float(np.nextafter(np.float32(edge), np.float32(math.inf)))
    betas = [1e-9, 0.2, float(rho.median()), 0.9, 1.0, 1.5, math.inf, 1e300]
    if k == 2:  # for k > 2, a ratio at the threshold itself depends on the order the weights are summed in
        betas += [edge, above]
    for beta in betas:
        ref_w, ref_idx = reference_skip(w, idx, beta, N_EXPERTS)
        for name, (new_w, new_idx) in {
            "skip_routing": skipping.skip_routing(w, idx, beta, N_EXPERTS),
            "one token at a time": [torch.cat(x) for x in zip(*(skipping.skipper(beta, N_EXPERTS)(w[t : t + 1], idx[t : t + 1]) for t in range(len(w))), strict=True)],
            "strided input": skipping.skip_routing(w.t().contiguous().t(), idx.t().contiguous().t(), beta, N_EXPERTS),
            "sorted rule": skipping._skip_sorted(w, idx, beta, N_EXPERTS),
            **({"torch top-2": skipping._skip_top2(w, idx, beta, N_EXPERTS)} if k == 2 else {}),
        }.items():
            assert torch.equal(new_idx, ref_idx), (name, beta)
            if k == 2:
                assert torch.equal(new_w, ref_w), (name, beta)  # the same float32 operations: the same bits
            else:  # sums of three or more weights may be added in another order
                torch.testing.assert_close(new_w, ref_w, rtol=1e-6, atol=0.0)
    if k == 2:
        assert not bool((skipping.skip_routing(w, idx, edge, N_EXPERTS)[1][4] == N_EXPERTS).any())
        assert bool((skipping.skip_routing(w, idx, above, N_EXPERTS)[1][4] == N_EXPERTS).any())


@pytest.mark.parametrize(
    ("model_type", "top_k"),
    [("mixtral", 2), ("qwen3_moe", 2), ("deepseek_v3", 2), ("phimoe", 2), ("gpt_oss", 2), ("mixtral", 3)],
)
@torch.no_grad()
def test_model_outputs_match_the_reference_rule(model_type: str, top_k: int) -> None:
    """Logits and dispatched slots with :func:`skipping.enable` equal those of the reference rule in the router hook."""
    model = tiny_model(model_type, top_k=top_k)
    adapter = get_adapter(model.config)
    ids = calibration_ids(2, 16, seed=3)
    thresholds = skipping.calibrate_thresholds(model, adapter, calibration_ids(), quantile=0.5, batch_size=4, progress=False)
    blocks = {i: adapter.moe_block(adapter.decoder_layers(model)[i]) for i in adapter.moe_layer_indices(model)}

    def run(inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        seen: list[torch.Tensor] = []
        hooks = [
            getattr(b, adapter.experts_attr).register_forward_pre_hook(
                lambda _m, args, kwargs: seen.append(skipping._routing_args(args, kwargs)[1].clone()), with_kwargs=True
            )
            for b in blocks.values()
        ]
        try:
            return model(input_ids=inputs).logits, seen
        finally:
            for h in hooks:
                h.remove()

    own = model.config._experts_implementation
    model.set_experts_implementation("eager")
    plain = model(input_ids=ids).logits
    model.set_experts_implementation(own)
    for inputs in (ids, ids[:1, :1]):  # a batch, and one decoding-sized token
        with skipping.enable(model, thresholds, count=False):
            fast, fast_slots = run(inputs)
        assert model.config._experts_implementation == own
        model.set_experts_implementation("eager")
        handles = [
            adapter.add_router_transform(b, lambda w, i, beta=thresholds[layer], n=adapter.block_num_experts(b): reference_skip(w, i, beta, n))
            for layer, b in blocks.items()
        ]
        try:
            ref, ref_slots = run(inputs)
        finally:
            for h in handles:
                h.remove()
            model.set_experts_implementation(own)
        assert torch.equal(fast, ref)
        assert len(fast_slots) == len(ref_slots) == len(blocks)
        assert all(torch.equal(a, b) for a, b in zip(fast_slots, ref_slots, strict=True))
        if inputs is ids:
            assert not torch.equal(fast, plain)  # the thresholds skip some experts
