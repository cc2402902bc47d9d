"""One factory for the tiny random models and tokenizer every test uses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: Tiny config builders per model type; the adapters' tests are parametrised over this table.
TINY_CONFIGS: dict[str, Callable[..., Any]] = {}


def tiny_config_builder(model_type: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a builder of a tiny random config for ``model_type``."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        TINY_CONFIGS[model_type] = fn
        return fn

    return decorate


@tiny_config_builder("mixtral")
def _mixtral(num_experts: int = 8, top_k: int = 2, layers: int = 2, hidden: int = 32, vocab: int = 320) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=128,
    )


#: Settings the tiny configs share (hidden 32, 4 heads of 8, 2 KV heads, vocab 320, special ids in the vocab).
_COMMON: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=None,
    bos_token_id=1,
    eos_token_id=2,
)


def _common(**overrides: Any) -> dict[str, Any]:
    return {**_COMMON, **overrides}


@tiny_config_builder("qwen2_moe")
def _qwen2_moe(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense (``mlp_only_layers``); a sigmoid-gated shared expert; no renormalisation."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**_common(
        num_hidden_layers=layers, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_experts=num_experts, num_experts_per_tok=top_k,
        norm_topk_prob=False, mlp_only_layers=[0], **kw,
    ))


@tiny_config_builder("qwen3_moe")
def _qwen3_moe(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense (``mlp_only_layers``); renormalised top-k."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**_common(
        num_hidden_layers=layers, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
        num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True, mlp_only_layers=[0], **kw,
    ))


@tiny_config_builder("olmoe")
def _olmoe(num_experts: int = 8, top_k: int = 2, layers: int = 2, **kw: Any) -> Any:
    from transformers import OlmoeConfig

    return OlmoeConfig(**_common(
        num_hidden_layers=layers, intermediate_size=16, num_experts=num_experts, num_experts_per_tok=top_k,
        norm_topk_prob=False, **kw,
    ))


@tiny_config_builder("flex_olmo")
def _flex_olmo(num_experts: int = 8, top_k: int = 2, layers: int = 2, **kw: Any) -> Any:
    from transformers import FlexOlmoConfig

    return FlexOlmoConfig(**_common(
        num_hidden_layers=layers, intermediate_size=16, num_experts=num_experts, num_experts_per_tok=top_k,
        norm_topk_prob=True, **kw,
    ))


@tiny_config_builder("minimax")
def _minimax(num_experts: int = 8, top_k: int = 2, layers: int = 2, **kw: Any) -> Any:
    """One lightning-attention layer, one full-attention layer."""
    from transformers import MiniMaxConfig

    return MiniMaxConfig(**_common(
        num_hidden_layers=layers, head_dim=8, intermediate_size=16, num_local_experts=num_experts,
        num_experts_per_tok=top_k, block_size=16,
        layer_types=["linear_attention", "full_attention"] * (layers // 2) + ["full_attention"] * (layers % 2),
        **kw,
    ))


@tiny_config_builder("deepseek_v2")
def _deepseek_v2(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; one shared expert; group-limited routing (2 groups, 1 chosen), scaled weights."""
    from transformers import DeepseekV2Config

    settings = dict(
        num_hidden_layers=layers, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=num_experts,
        num_experts_per_tok=top_k, n_shared_experts=1, first_k_dense_replace=1, topk_method="group_limited_greedy",
        n_group=2, topk_group=1, routed_scaling_factor=1.5, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4,
    )
    settings.update(kw)
    return DeepseekV2Config(**_common(**settings))


@tiny_config_builder("deepseek_v3")
def _deepseek_v3(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; one shared expert; sigmoid router with 2 groups (1 chosen), renormalised, x2.5."""
    from transformers import DeepseekV3Config

    settings = dict(
        num_hidden_layers=layers, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=num_experts,
        num_experts_per_tok=top_k, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4,
    )
    settings.update(kw)
    return DeepseekV3Config(**_common(**settings))


@tiny_config_builder("glm4_moe")
def _glm4_moe(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; one shared expert; sigmoid router with 2 groups (1 chosen)."""
    from transformers import Glm4MoeConfig

    settings = dict(
        num_hidden_layers=layers, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
        n_routed_experts=num_experts, num_experts_per_tok=top_k, n_shared_experts=1, first_k_dense_replace=1,
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
    )
    settings.update(kw)
    return Glm4MoeConfig(**_common(**settings))


@tiny_config_builder("dots1")
def _dots1(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; one shared expert; sigmoid router, one group, not renormalised."""
    from transformers import Dots1Config

    settings = dict(
        num_hidden_layers=layers, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
        n_routed_experts=num_experts, num_experts_per_tok=top_k, n_shared_experts=1, first_k_dense_replace=1,
        norm_topk_prob=False, routed_scaling_factor=1.0,
    )
    settings.update(kw)
    return Dots1Config(**_common(**settings))


@tiny_config_builder("phimoe")
def _phimoe(num_experts: int = 8, top_k: int = 2, layers: int = 2, **kw: Any) -> Any:
    """A wide SparseMixer threshold so the masked softmax actually masks."""
    from transformers import PhimoeConfig

    return PhimoeConfig(**_common(
        num_hidden_layers=layers, intermediate_size=16, num_local_experts=num_experts, num_experts_per_tok=top_k,
        router_jitter_noise=0.3, **kw,
    ))


@tiny_config_builder("granitemoe")
def _granitemoe(num_experts: int = 8, top_k: int = 2, layers: int = 2, **kw: Any) -> Any:
    from transformers import GraniteMoeConfig

    return GraniteMoeConfig(**_common(
        num_hidden_layers=layers, intermediate_size=16, num_local_experts=num_experts, num_experts_per_tok=top_k,
        residual_multiplier=0.5, **kw,
    ))


@tiny_config_builder("granitemoeshared")
def _granitemoeshared(num_experts: int = 8, top_k: int = 2, layers: int = 2, **kw: Any) -> Any:
    """A shared MLP beside every MoE block."""
    from transformers import GraniteMoeSharedConfig

    return GraniteMoeSharedConfig(**_common(
        num_hidden_layers=layers, intermediate_size=16, num_local_experts=num_experts, num_experts_per_tok=top_k,
        shared_intermediate_size=24, **kw,
    ))


@tiny_config_builder("gpt_oss")
def _gpt_oss(num_experts: int = 8, top_k: int = 2, layers: int = 2, **kw: Any) -> Any:
    """Sliding and full attention layers; router and expert biases."""
    from transformers import GptOssConfig

    return GptOssConfig(**_common(
        num_hidden_layers=layers, head_dim=8, intermediate_size=16, num_local_experts=num_experts,
        num_experts_per_tok=top_k, sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
        **kw,
    ))


@tiny_config_builder("llama4_text")
def _llama4_text(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense (``moe_layers``); a shared expert; top-2 (released models use top-1)."""
    from transformers import Llama4TextConfig

    return Llama4TextConfig(**_common(
        num_hidden_layers=layers, head_dim=8, intermediate_size=16, intermediate_size_mlp=48,
        num_local_experts=num_experts, num_experts_per_tok=top_k, moe_layers=list(range(1, layers)),
        attention_chunk_size=16, **kw,
    ))


@tiny_config_builder("hunyuan_v1_moe")
def _hunyuan_v1_moe(num_experts: int = 8, top_k: int = 2, layers: int = 2, **kw: Any) -> Any:
    """A shared MLP in every block."""
    from transformers import HunYuanMoEV1Config

    return HunYuanMoEV1Config(**_common(
        num_hidden_layers=layers, head_dim=8, intermediate_size=16, num_experts=num_experts, moe_topk=top_k, **kw,
    ))


@tiny_config_builder("ernie4_5_moe")
def _ernie4_5_moe(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense (``moe_layer_start_index``); one shared expert; bias-corrected choice."""
    from transformers import Ernie4_5_MoeConfig

    return Ernie4_5_MoeConfig(**_common(
        num_hidden_layers=layers, intermediate_size=48, moe_intermediate_size=16, moe_num_experts=num_experts,
        moe_k=top_k, moe_num_shared_experts=1, moe_layer_start_index=1, **kw,
    ))


def _sigmoid_router_settings(num_experts: int, top_k: int, layers: int, n_group: int = 2) -> dict[str, Any]:
    """DeepSeek-V3-style router settings: 2 groups (1 chosen), renormalised, scaled."""
    return dict(
        num_hidden_layers=layers, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=num_experts,
        num_experts_per_tok=top_k, n_group=n_group, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
    )


#: Multi-head latent attention (DeepSeek-style) settings for tiny configs.
_MLA = dict(
    kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4
)


@tiny_config_builder("glm4_moe_lite")
def _glm4_moe_lite(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense (``mlp_layer_types``); MLA attention; one shared expert."""
    from transformers import Glm4MoeLiteConfig

    settings = dict(_sigmoid_router_settings(num_experts, top_k, layers), **_MLA, n_shared_experts=1,
                    mlp_layer_types=["dense"] + ["sparse"] * (layers - 1))
    settings.update(kw)
    return Glm4MoeLiteConfig(**_common(**settings))


@tiny_config_builder("deepseek_v32")
def _deepseek_v32(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; MLA with the sparse-attention indexer; one shared expert."""
    from transformers import DeepseekV32Config

    settings = dict(_sigmoid_router_settings(num_experts, top_k, layers), **_MLA, n_shared_experts=1,
                    first_k_dense_replace=1, index_topk=8, index_head_dim=8, index_n_heads=2, head_dim=8)
    settings.update(kw)
    return DeepseekV32Config(**_common(**settings))


@tiny_config_builder("solar_open")
def _solar_open(num_experts: int = 8, top_k: int = 2, layers: int = 2, **kw: Any) -> Any:
    """Every layer MoE with one shared expert."""
    from transformers import SolarOpenConfig

    settings = dict(_sigmoid_router_settings(num_experts, top_k, layers), n_shared_experts=1, head_dim=8)
    settings.update(kw)
    return SolarOpenConfig(**_common(**settings))


@tiny_config_builder("mimo_v2_flash")
def _mimo_v2_flash(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; sliding and full attention; no shared expert."""
    from transformers import MiMoV2FlashConfig

    settings = dict(_sigmoid_router_settings(num_experts, top_k, layers), head_dim=8, v_head_dim=8, sliding_window=8,
                    layer_types=["full_attention"] + ["sliding_attention"] * (layers - 1),
                    mlp_layer_types=["dense"] + ["sparse"] * (layers - 1))
    settings.update(kw)
    return MiMoV2FlashConfig(**_common(**settings))


@tiny_config_builder("exaone_moe")
def _exaone_moe(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; one shared expert."""
    from transformers import ExaoneMoeConfig

    settings = _sigmoid_router_settings(num_experts, top_k, layers)
    settings["num_experts"] = settings.pop("n_routed_experts")
    settings.update(head_dim=8, num_shared_experts=1, mlp_layer_types=["dense"] + ["sparse"] * (layers - 1))
    settings.update(kw)
    return ExaoneMoeConfig(**_common(**settings))


@tiny_config_builder("nemotron_h")
def _nemotron_h(num_experts: int = 8, top_k: int = 2, layers: int = 4, **kw: Any) -> Any:
    """Mamba, attention, MoE, MoE blocks; a latent projection with biases around the experts."""
    from transformers import NemotronHConfig

    settings = dict(_sigmoid_router_settings(num_experts, top_k, layers), n_shared_experts=1,
                    moe_shared_expert_intermediate_size=24, moe_latent_size=16, mlp_bias=True, head_dim=8,
                    layers_block_type=["mamba", "attention", "moe", "moe"][:layers], mamba_num_heads=4,
                    mamba_head_dim=8, ssm_state_size=8, n_groups=1, chunk_size=8)
    settings.update(kw)
    return NemotronHConfig(**_common(**settings))


@tiny_config_builder("qwen3_next")
def _qwen3_next(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Gated-DeltaNet and full attention; layer 0 dense; a sigmoid-gated shared expert."""
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(**_common(
        num_hidden_layers=layers, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
        mlp_only_layers=[0], linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4, layer_types=["linear_attention", "full_attention", "linear_attention"][:layers],
        **kw,
    ))


@tiny_config_builder("qwen3_5_moe_text")
def _qwen3_5_moe_text(num_experts: int = 8, top_k: int = 2, layers: int = 2, **kw: Any) -> Any:
    """Gated-DeltaNet and full attention; a sigmoid-gated shared expert."""
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(**_common(
        num_hidden_layers=layers, head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_experts=num_experts, num_experts_per_tok=top_k, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"][:layers],
        **kw,
    ))


@tiny_config_builder("jamba")
def _jamba(num_experts: int = 8, top_k: int = 2, layers: int = 2, **kw: Any) -> Any:
    """Layer 0 Mamba + dense MLP, layer 1 attention + MoE."""
    from transformers import JambaConfig

    return JambaConfig(**_common(
        num_hidden_layers=layers, intermediate_size=16, num_experts=num_experts, num_experts_per_tok=top_k,
        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
        mamba_d_state=8, mamba_expand=2, **kw,
    ))


@tiny_config_builder("granitemoehybrid")
def _granitemoehybrid(num_experts: int = 8, top_k: int = 2, layers: int = 2, **kw: Any) -> Any:
    """A Mamba-2 layer and an attention layer, both with MoE and a shared MLP."""
    from transformers import GraniteMoeHybridConfig

    return GraniteMoeHybridConfig(**_common(
        num_hidden_layers=layers, intermediate_size=16, num_local_experts=num_experts, num_experts_per_tok=top_k,
        shared_intermediate_size=24, layer_types=["mamba", "attention"][:layers], mamba_n_heads=4, mamba_d_state=8,
        mamba_d_head=16, mamba_chunk_size=8, **kw,
    ))


@tiny_config_builder("lfm2_moe")
def _lfm2_moe(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; short-convolution and attention layers; block-level selection bias."""
    from transformers import Lfm2MoeConfig

    return Lfm2MoeConfig(**_common(
        num_hidden_layers=layers, intermediate_size=48, moe_intermediate_size=16, num_experts=num_experts,
        num_experts_per_tok=top_k, num_dense_layers=1, routed_scaling_factor=1.5,
        layer_types=["conv", "full_attention", "conv"][:layers], **kw,
    ))


@tiny_config_builder("minimax_m2")
def _minimax_m2(num_experts: int = 8, top_k: int = 2, layers: int = 2, **kw: Any) -> Any:
    from transformers import MiniMaxM2Config

    return MiniMaxM2Config(**_common(
        num_hidden_layers=layers, head_dim=8, intermediate_size=16, num_local_experts=num_experts,
        num_experts_per_tok=top_k, **kw,
    ))


@tiny_config_builder("cohere2_moe")
def _cohere2_moe(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; one shared expert combined by ``average``."""
    from transformers import Cohere2MoeConfig

    return Cohere2MoeConfig(**_common(
        num_hidden_layers=layers, head_dim=8, intermediate_size=16, prefix_dense_intermediate_size=48,
        num_experts=num_experts, num_experts_per_tok=top_k, num_shared_experts=1,
        shared_expert_combination_strategy="average", mlp_layer_types=["dense"] + ["sparse"] * (layers - 1), **kw,
    ))


@tiny_config_builder("hy_v3")
def _hy_v3(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; a shared expert; block-level selection bias."""
    from transformers import HYV3Config

    return HYV3Config(**_common(
        num_hidden_layers=layers, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_experts=num_experts,
        num_experts_per_tok=top_k, num_shared_experts=1, router_scaling_factor=2.5,
        mlp_layer_types=["dense"] + ["sparse"] * (layers - 1), **kw,
    ))


@tiny_config_builder("kimi_linear")
def _kimi_linear(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; linear and full (MLA) attention; sigmoid router with 2 groups."""
    from transformers import KimiLinearConfig

    settings = _sigmoid_router_settings(num_experts, top_k, layers)
    settings["num_local_experts"] = settings.pop("n_routed_experts")
    settings.update(**_MLA, n_shared_experts=1, mlp_layer_types=["dense"] + ["sparse"] * (layers - 1),
                    layer_types=["linear_attention", "full_attention", "linear_attention"][:layers],
                    linear_head_dim=8, linear_num_heads=4)
    settings.update(kw)
    return KimiLinearConfig(**_common(**settings))


@tiny_config_builder("bailing_hybrid")
def _bailing_hybrid(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; linear and full (MLA) attention; sigmoid router with 2 groups."""
    from transformers import BailingHybridConfig

    settings = _sigmoid_router_settings(num_experts, top_k, layers)
    settings["num_local_experts"] = settings.pop("n_routed_experts")
    settings.update(**_MLA, n_shared_experts=1, head_dim=8, first_k_dense_replace=1,
                    mlp_layer_types=["dense"] + ["sparse"] * (layers - 1),
                    layer_types=["linear_attention", "full_attention", "linear_attention"][:layers])
    settings.update(kw)
    return BailingHybridConfig(**_common(**settings))


@tiny_config_builder("axk2")
def _axk2(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; MLA with the sparse-attention indexer; sigmoid router with 2 groups."""
    from transformers import AXK2Config

    settings = dict(_sigmoid_router_settings(num_experts, top_k, layers), **_MLA, n_shared_experts=1, head_dim=8,
                    mlp_layer_types=["dense"] + ["sparse"] * (layers - 1), index_topk=8, index_head_dim=8,
                    index_n_heads=2, gated_norm_rank=4)
    settings.update(kw)
    return AXK2Config(**_common(**settings))


@tiny_config_builder("beam")
def _beam(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; sigmoid router with 2 groups; scaling applied after the experts."""
    from transformers import BeamConfig

    settings = _sigmoid_router_settings(num_experts, top_k, layers)
    settings["num_experts"] = settings.pop("n_routed_experts")
    settings.update(head_dim=8, sliding_window=8, mlp_layer_types=["dense"] + ["sparse"] * (layers - 1))
    settings.update(kw)
    return BeamConfig(**_common(**settings))


@tiny_config_builder("mellum")
def _mellum(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense."""
    from transformers import MellumConfig

    return MellumConfig(**_common(
        num_hidden_layers=layers, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_experts=num_experts,
        num_experts_per_tok=top_k, sliding_window=8, mlp_layer_types=["dense"] + ["sparse"] * (layers - 1), **kw,
    ))


@tiny_config_builder("flint")
def _flint(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense (``mlp_only_layers``); an ungated shared expert."""
    from transformers import FlintConfig

    return FlintConfig(**_common(
        num_hidden_layers=layers, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_experts=num_experts, num_experts_per_tok=top_k, mlp_only_layers=[0],
        sliding_window=8, **kw,
    ))


@tiny_config_builder("kolibri1")
def _kolibri1(num_experts: int = 8, top_k: int = 2, layers: int = 2, **kw: Any) -> Any:
    """A shared expert; selection bias on the logits; renormalised."""
    from transformers import Kolibri1Config

    return Kolibri1Config(**_common(
        num_hidden_layers=layers, head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True, sliding_window=8, **kw,
    ))


@tiny_config_builder("laguna")
def _laguna(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; soft-capped router logits; scaling applied after the experts; a shared expert."""
    from transformers import LagunaConfig

    return LagunaConfig(**_common(
        num_hidden_layers=layers, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_experts=num_experts, num_experts_per_tok=top_k, sliding_window=8,
        mlp_layer_types=["dense"] + ["sparse"] * (layers - 1), moe_routed_scaling_factor=2.5,
        moe_router_logit_softcapping=2.0, **kw,
    ))


@tiny_config_builder("afmoe")
def _afmoe(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; shared experts; block-level selection bias; scaled weights."""
    from transformers import AfmoeConfig

    return AfmoeConfig(**_common(
        num_hidden_layers=layers, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_dense_layers=1,
        num_experts=num_experts, num_experts_per_tok=top_k, num_shared_experts=1, route_scale=2.0,
        sliding_window=8, global_attn_every_n_layers=2, **kw,
    ))


@tiny_config_builder("granitemoe_swa")
def _granitemoe_swa(num_experts: int = 8, top_k: int = 2, layers: int = 2, **kw: Any) -> Any:
    """Sliding-window attention; a shared MLP beside every MoE block."""
    from transformers import GraniteMoeSWAConfig

    return GraniteMoeSWAConfig(**_common(
        num_hidden_layers=layers, intermediate_size=16, num_local_experts=num_experts, num_experts_per_tok=top_k,
        shared_intermediate_size=24, sliding_window=8, **kw,
    ))


@tiny_config_builder("minimax_m3_vl_text")
def _minimax_m3_vl_text(num_experts: int = 8, top_k: int = 2, layers: int = 3, **kw: Any) -> Any:
    """Layer 0 dense; shared experts; scaling applied after the experts."""
    from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLTextConfig

    return MiniMaxM3VLTextConfig(**_common(
        num_hidden_layers=layers, head_dim=8, intermediate_size=16, dense_intermediate_size=48,
        shared_intermediate_size=24, num_local_experts=num_experts, num_experts_per_tok=top_k,
        routed_scaling_factor=2.0, rotary_dim=4, mlp_layer_types=["dense"] + ["sparse"] * (layers - 1),
        index_n_heads=2, index_head_dim=8, index_block_size=4, index_topk_blocks=2, **kw,
    ))


def tiny_config(model_type: str = "mixtral", **overrides: Any) -> Any:
    """A tiny random config of ``model_type``."""
    return TINY_CONFIGS[model_type](**overrides)


def tiny_model(model_type: str = "mixtral", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """A tiny randomly initialised causal LM in eval mode.

    Router weights are scaled up so routing is decisive (random init leaves it near uniform), and
    selection biases (DeepSeek-V3 style) are made non-zero so they matter.
    """
    from transformers import AutoModelForCausalLM

    from pipeline.models import get_adapter

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).to(dtype).eval()
    adapter = get_adapter(model.config)
    layers = adapter.decoder_layers(model)
    with torch.no_grad():
        for i in adapter.moe_layer_indices(model):
            block = adapter.moe_block(layers[i])
            adapter.router_weight(block).normal_(0.0, 0.5)
            bias = adapter.choice_bias(block)
            if bias is not None:
                bias.normal_(0.0, 0.3)
    return model


def save_tiny_checkpoint(
    path: Path, model_type: str = "mixtral", seed: int = 0, *, max_shard_size: str | None = None, **overrides: Any
) -> Path:
    """Save a tiny model plus a tiny tokenizer as a standard checkpoint directory.

    With ``max_shard_size`` (e.g. ``"100KB"``), the weights are several shards plus an index.
    """
    model = tiny_model(model_type, seed=seed, **overrides)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


def tiny_tokenizer(vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer with ``vocab_size`` entries, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog.", "12 + 35 = 47"] * 20
    tok.train_from_iterator(text, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def dense_checkpoint(path: Path) -> Path:
    """A tiny dense (non-MoE) Mistral checkpoint saved at ``path``."""
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path
