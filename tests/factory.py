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


def tiny_config(model_type: str = "mixtral", **overrides: Any) -> Any:
    """A tiny random config of ``model_type``."""
    return TINY_CONFIGS[model_type](**overrides)


def tiny_model(model_type: str = "mixtral", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """A tiny randomly initialised causal LM in eval mode.

    Router weights are scaled up so routing is decisive (random init leaves it near uniform).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".gate.weight", ".router.weight")) and param.dim() == 2:
                param.normal_(0.0, 0.5)
    return model


def save_tiny_checkpoint(path: Path, model_type: str = "mixtral", seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny model plus a tiny tokenizer as a standard checkpoint directory."""
    model = tiny_model(model_type, seed=seed, **overrides)
    model.save_pretrained(path)
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
