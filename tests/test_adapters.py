"""Every registered MoE family, on a tiny random model: routing, decomposition, export equivalence,
identity pruning, save/reload, untouched shared parts, router transforms.

Parametrised over ``supported_model_types()``: a new family gets every test by registering an
adapter and a tiny config builder in ``tests/factory.py``.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.export import Selection, prune_model
from pipeline.models import MoEAdapter, get_adapter, supported_model_types
from pipeline.models.registry import families_table
from tests.factory import TINY_CONFIGS, tiny_model

MODEL_TYPES = supported_model_types()
TOKENS = (2, 12)  # batch, sequence length


@dataclass
class Family:
    model_type: str
    adapter: MoEAdapter
    model: nn.Module
    input_ids: torch.Tensor
    moe_inputs: dict[int, torch.Tensor]  # layer -> MoE block input [T, d]

    @property
    def config(self) -> Any:
        return self.model.config

    def block(self, i: int) -> nn.Module:
        return self.adapter.moe_block(self.adapter.decoder_layers(self.model)[i])


def capture_moe_inputs(model: nn.Module, adapter: MoEAdapter, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each MoE block's input on ``input_ids``, flattened to ``[T, d]``."""
    layers = adapter.decoder_layers(model)
    found: dict[int, torch.Tensor] = {}
    handles = []
    for i in adapter.moe_layer_indices(model):

        def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            found[i] = x.detach().reshape(-1, x.shape[-1]).clone()

        handles.append(adapter.moe_block(layers[i]).register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return found


@pytest.fixture(scope="module", params=MODEL_TYPES)
def family(request: pytest.FixtureRequest) -> Family:
    model_type = request.param
    model = tiny_model(model_type, seed=0)
    adapter = get_adapter(model.config)
    vocab = model.config.get_text_config().vocab_size
    input_ids = torch.randint(3, vocab, TOKENS, generator=torch.Generator().manual_seed(1))
    return Family(model_type, adapter, model, input_ids, capture_moe_inputs(model, adapter, input_ids))


def combine(weights: torch.Tensor, ids: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """``sum_j weights[:, j] * outputs[t, ids[t, j]]`` -> ``[T, d]``."""
    picked = outputs.gather(1, ids.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]))
    return (weights.unsqueeze(-1).to(outputs.dtype) * picked).sum(dim=1)


def with_shared(adapter: MoEAdapter, block: nn.Module, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    shared = adapter.shared_output(block, x)
    return routed if shared is None else routed + shared


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Close relative to the size of ``expected`` (tiny random experts give small outputs)."""
    scale = expected.abs().max().item()
    assert scale > 0, "degenerate test: the expected output is all zeros"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def sorted_by_id(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.argsort(dim=-1)
    return weights.gather(-1, order), ids.gather(-1, order)


def kept_sets(family: Family, layer: int) -> list[list[int]]:
    """Random kept sets of size n // 2 and n - 1 (both within ``top_k <= r < n``), seeded per family."""
    n, k = family.adapter.num_experts(family.config), family.adapter.top_k(family.config)
    rng = random.Random(f"{family.model_type}-{layer}")
    sizes = sorted({max(k, n // 2), n - 1})
    return [sorted(rng.sample(range(n), r)) for r in sizes]


# -- registry ------------------------------------------------------------------------------------


def test_every_supported_type_has_a_tiny_config() -> None:
    assert set(MODEL_TYPES) <= set(TINY_CONFIGS), f"no tiny config for {set(MODEL_TYPES) - set(TINY_CONFIGS)}"
    assert set(TINY_CONFIGS) <= set(MODEL_TYPES), f"no adapter for {set(TINY_CONFIGS) - set(MODEL_TYPES)}"


def test_dense_model_is_one_clear_error() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(PipelineError) as info:
        get_adapter(config)
    message = str(info.value)
    assert "'llama'" in message and "\n" not in message
    for model_type in MODEL_TYPES:
        assert model_type in message


def test_unknown_model_type_is_one_clear_error() -> None:
    from transformers import PretrainedConfig

    class FutureMoeConfig(PretrainedConfig):
        model_type = "future_moe"

    with pytest.raises(PipelineError, match=r"'future_moe' is not a supported .*supported: .*mixtral") as info:
        get_adapter(FutureMoeConfig())
    assert "\n" not in str(info.value)


def test_families_table_is_in_the_docs() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    assert families_table() in docs, "docs/models.md is stale: paste pipeline.models.registry.families_table()"


# -- per family ----------------------------------------------------------------------------------


def test_structure(family: Family) -> None:
    adapter, config = family.adapter, family.config
    layers = adapter.decoder_layers(family.model)
    moe, dense = adapter.moe_layer_indices(family.model), adapter.dense_layer_indices(family.model)
    assert moe and sorted(moe + dense) == list(range(len(layers)))
    n = adapter.num_experts(config)
    for i in moe:
        assert adapter.block_num_experts(family.block(i)) == n
    assert 1 <= adapter.top_k(config) < n


def test_pruned_config(family: Family) -> None:
    adapter, config = family.adapter, family.config
    n, k = adapter.num_experts(config), adapter.top_k(config)
    before = config.to_dict()
    pruned = adapter.pruned_config(config, n - 1)
    assert adapter.num_experts(pruned) == n - 1 and adapter.top_k(pruned) == k
    assert config.to_dict() == before, "pruned_config must not modify its input"
    for bad in (k - 1, n + 1):
        with pytest.raises(PipelineError):
            adapter.pruned_config(config, bad)


def test_group_limited_routing_survives_only_even_splits(family: Family) -> None:
    text = family.adapter.text_config(family.config)
    n_group = getattr(text, "n_group", None) or 1
    if n_group == 1:
        pytest.skip("no group-limited routing in this family's tiny config")
    n = family.adapter.num_experts(family.config)
    kept_groups = family.adapter.text_config(family.adapter.pruned_config(family.config, n // 2))
    assert kept_groups.n_group == n_group  # 8 -> 4 experts: 2 groups of 2 still hold top_k = 2
    uneven = family.adapter.text_config(family.adapter.pruned_config(family.config, n - 1))
    assert uneven.n_group == 1 and uneven.topk_group == 1


def test_route_reproduces_the_router(family: Family) -> None:
    adapter = family.adapter
    for i, x in family.moe_inputs.items():
        block = family.block(i)
        with torch.no_grad():
            want_w, want_ids = sorted_by_id(*adapter.router_decisions(block, x))
            got_w, got_ids = sorted_by_id(*adapter.route(block, adapter.router_logits(block, x), family.config))
        assert torch.equal(got_ids, want_ids), f"layer {i}: expert choice differs from the model's router"
        torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7)


def test_streams_layer_by_layer(family: Family) -> None:
    """The layer-streaming loop yields every MoE layer with exactly the block inputs of a full forward."""
    from pipeline.streaming import stream_layers

    adapter = family.adapter
    model = copy.deepcopy(family.model)
    seen = []
    batch = family.input_ids.shape[0]  # one micro-batch: the same matmul shapes as the full forward
    steps = stream_layers(model, adapter, family.input_ids, batch_size=batch, device=model.device, progress=False)
    for step in steps:
        if step.block is not None:
            seen.append(step.index)
            assert torch.equal(step.moe_tokens(), family.moe_inputs[step.index])
    assert seen == adapter.moe_layer_indices(model)


def test_routed_plus_shared_is_the_block_output(family: Family) -> None:
    adapter = family.adapter
    for i, x in family.moe_inputs.items():
        block = family.block(i)
        with torch.no_grad():
            outputs = adapter.expert_outputs(block, x)
            weights, ids = adapter.route(block, adapter.router_logits(block, x), family.config)
            routed = combine(weights, ids, outputs)
            shared = adapter.shared_output(block, x)
            assert routed.abs().max() > 0
            if adapter.shared_modules(block):
                assert shared is not None and shared.abs().max() > 0
            assert_close_rel(with_shared(adapter, block, x, routed), adapter.block_output(block, x))


def test_pruned_block_equals_masked_routing(family: Family) -> None:
    """Export equivalence: the sliced block computes the search's Z_hat(S)."""
    adapter, config = family.adapter, family.config
    for i, x in family.moe_inputs.items():
        block = family.block(i)
        with torch.no_grad():
            outputs = adapter.expert_outputs(block, x)
            logits = adapter.router_logits(block, x)
            for kept in kept_sets(family, i):
                pruned_config = adapter.pruned_config(config, len(kept))
                new = adapter.prune_block(block, kept, pruned_config, i)
                assert adapter.block_num_experts(new) == len(kept)
                weights, ids = adapter.route(block, logits, config, kept)
                assert set(ids.unique().tolist()) <= set(kept)
                z_hat = with_shared(adapter, block, x, combine(weights, ids, outputs))
                assert_close_rel(adapter.block_output(new, x), z_hat)
                # the pruned block's own routing, mapped back to original ids, is the same decision
                local_w, local_ids = adapter.route(new, adapter.router_logits(new, x), pruned_config)
                kept_t = torch.tensor(kept)
                assert torch.equal(sorted_by_id(local_w, kept_t[local_ids])[1], sorted_by_id(weights, ids)[1])


def test_identity_prune_reproduces_logits_exactly(family: Family) -> None:
    adapter = family.adapter
    model = copy.deepcopy(family.model)
    prune_model(model, adapter, Selection.identity(model, adapter), progress=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=family.input_ids).logits, family.model(input_ids=family.input_ids).logits)


@pytest.fixture(scope="module")
def exported(
    family: Family, tmp_path_factory: pytest.TempPathFactory
) -> tuple[nn.Module, nn.Module, dict[int, list[int]]]:
    """The tiny model pruned to n - 2 experts per layer in memory, and the same saved and reloaded."""
    from transformers import AutoModelForCausalLM

    adapter = family.adapter
    n = adapter.num_experts(family.config)
    rng = random.Random(family.model_type)
    model = copy.deepcopy(family.model)
    kept = {i: sorted(rng.sample(range(n), n - 2)) for i in adapter.moe_layer_indices(model)}
    prune_model(model, adapter, Selection.of(model, adapter, kept, "random"), progress=False)
    path = tmp_path_factory.mktemp(family.model_type)
    model.save_pretrained(path)
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, reloaded, kept


def test_exported_model_reloads_with_the_same_logits(family: Family, exported: Any) -> None:
    model, reloaded, kept = exported
    adapter = family.adapter
    assert type(reloaded) is type(family.model)
    assert adapter.num_experts(reloaded.config) == len(next(iter(kept.values())))
    assert adapter.moe_layer_indices(reloaded) == sorted(kept)
    with torch.no_grad():
        in_memory = model(input_ids=family.input_ids).logits
        assert not torch.equal(in_memory, family.model(input_ids=family.input_ids).logits)
        assert_close_rel(reloaded(input_ids=family.input_ids).logits, in_memory, rtol=1e-6)
        # Bit-exact once the weights are re-allocated: memory-mapped safetensors leave tensors at other
        # alignments, which can change CPU kernels' rounding in the last bit.
        aligned = copy.deepcopy(reloaded)
        for param in aligned.parameters():
            param.data = param.data.clone()
        assert torch.equal(aligned(input_ids=family.input_ids).logits, in_memory)


def test_shared_experts_and_dense_layers_are_byte_identical(family: Family, exported: Any) -> None:
    _model, reloaded, kept = exported
    adapter = family.adapter
    n = adapter.num_experts(family.config)
    layers = adapter.decoder_layers(family.model)
    layer_prefix = _prefix_of(family.model, layers)
    expert_names = set()
    for i in kept:
        for name, tensor in family.block(i).state_dict().items():
            if adapter.is_expert_tensor(name, tensor, n):
                expert_names.add(f"{layer_prefix}{i}.{adapter.mlp_attr}.{name}")
    after = reloaded.state_dict()
    protected = _protected_names(family, layer_prefix)
    checked = 0
    for name, tensor in family.model.state_dict().items():
        if name in expert_names:
            continue
        assert name in after, f"{name} missing after export"
        assert after[name].dtype == tensor.dtype and after[name].shape == tensor.shape, name
        assert torch.equal(after[name].contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)), name
        checked += name in protected
    assert checked == len(protected), "shared experts / dense layers were not all compared"


def _prefix_of(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name + "."
    raise AssertionError("decoder layers not found among the model's modules")


def _protected_names(family: Family, layer_prefix: str) -> set[str]:
    """State-dict names of shared experts and of dense layers' feed-forward blocks."""
    adapter = family.adapter
    layers = adapter.decoder_layers(family.model)
    names = set()
    for i in adapter.moe_layer_indices(family.model):
        for attr, module in adapter.shared_modules(family.block(i)).items():
            names |= {f"{layer_prefix}{i}.{adapter.mlp_attr}.{attr}.{p}" for p in module.state_dict()}
    for i in adapter.dense_layer_indices(family.model):
        names |= {f"{layer_prefix}{i}.{p}" for p in layers[i].state_dict()}
    return names


@pytest.mark.parametrize("implementation", ["eager", "default"])
def test_router_transform_identity_and_sentinel_drop(family: Family, implementation: str) -> None:
    adapter = family.adapter
    model = copy.deepcopy(family.model)
    if implementation == "eager":
        model.set_experts_implementation("eager")
    layers = adapter.decoder_layers(model)
    n = adapter.num_experts(family.config)
    for i, x in family.moe_inputs.items():
        block = adapter.moe_block(layers[i])
        with torch.no_grad():
            reference = adapter.block_output(block, x)
            experts = getattr(block, adapter.experts_attr)
            flag = getattr(experts, "_is_expert_parallel", None)
            handle = adapter.add_router_transform(block, lambda w, idx: (w, idx))
            assert torch.equal(adapter.block_output(block, x), reference)
            assert flag is None or experts._is_expert_parallel, "sentinel masking must be on while transforming"
            handle.remove()
            assert getattr(experts, "_is_expert_parallel", None) == flag
            first = adapter.add_router_transform(block, lambda w, idx: (w, idx))
            second = adapter.add_router_transform(block, lambda w, idx: (w, idx))
            first.remove()
            assert flag is None or experts._is_expert_parallel, "a remaining transform keeps sentinel masking on"
            second.remove()
            second.remove()
            assert getattr(experts, "_is_expert_parallel", None) == flag

            seen: dict[str, torch.Tensor] = {}

            def drop_last_slot_on_odd_tokens(w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                seen["w"], seen["idx"] = w.clone(), idx.clone()
                new_idx = idx.clone()
                new_idx[1::2, -1] = n
                return w, new_idx

            handle = adapter.add_router_transform(block, drop_last_slot_on_odd_tokens)
            dropped_out = adapter.block_output(block, x)
            handle.remove()
            assert torch.equal(adapter.block_output(block, x), reference), "remove() must restore the router"

            keep = torch.ones_like(seen["w"])
            keep[1::2, -1] = 0
            routed = combine(seen["w"] * keep, seen["idx"], adapter.expert_outputs(block, x))
            expected = with_shared(adapter, block, x, routed)
            assert_close_rel(dropped_out, expected)
            assert not torch.allclose(dropped_out[1::2], reference[1::2])
            assert_close_rel(dropped_out[0::2], reference[0::2])


def test_route_reproduces_the_router_in_bfloat16(family: Family, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Router logits are computed as the family's router computes them, so the choice matches in bf16
    too (loaded as users load it: ``from_pretrained(dtype=bfloat16)`` keeps the fp32 modules fp32)."""
    from transformers import AutoModelForCausalLM

    adapter = family.adapter
    path = tmp_path_factory.mktemp(f"{family.model_type}-bf16")
    family.model.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    for i, x in capture_moe_inputs(model, adapter, family.input_ids).items():
        block = adapter.moe_block(adapter.decoder_layers(model)[i])
        with torch.no_grad():
            want_w, want_ids = sorted_by_id(*adapter.router_decisions(block, x))
            got_w, got_ids = sorted_by_id(*adapter.route(block, adapter.router_logits(block, x), model.config))
        assert torch.equal(got_ids, want_ids), f"layer {i}: bf16 expert choice differs from the model's router"
        torch.testing.assert_close(got_w, want_w, rtol=1e-2, atol=1e-3)
