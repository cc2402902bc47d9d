"""Decoding speed and expert evaluations per token of model variants, measured side by side.

Greedy ``generate`` at batch size 1 with a fixed number of new tokens per prompt (the paper's
protocol). All variants are measured in one process, round-robin within every repeat (the order
rotating between repeats), so drift in machine load hits every variant alike; the reported speed
is the median over repeats of new tokens per second.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.errors import PipelineError
from pipeline.models import get_adapter

log = logging.getLogger(__name__)


@dataclass
class SpeedCase:
    """One variant to time: a loaded model and, for a skip variant, its per-layer thresholds."""

    name: str
    model: nn.Module
    skip: bool = False
    thresholds: Mapping[str, float] | None = None


@dataclass
class SpeedResult:
    """Median tokens/s over the timed repeats, every repeat's value, and expert use per token."""

    name: str
    tokens_per_s: float
    runs: list[float] = field(default_factory=list)
    new_tokens_per_run: int = 0
    expert_evals_per_token: float | None = None
    skipped_fraction: float | None = None


class ExpertCounter:
    """Counts expert evaluations routed by every MoE router of a model (through the adapter).

    ``evals_per_token`` = evaluated (token, expert) pairs / (tokens x MoE layers): the number of
    experts a token runs per MoE layer (``top_k`` for a model without skipping). Slots marked as
    not computed (an index equal to the block's expert count) are not counted.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapter = get_adapter(model.config)
        self.expert_evals = 0
        self.token_layers = 0
        self._handles: list[Any] = []

    def __enter__(self) -> ExpertCounter:
        for layer in self.adapter.decoder_layers(self.model):
            block = self.adapter.moe_block(layer)
            if block is None:
                continue
            n = self.adapter.block_num_experts(block)
            self._handles.append(self.adapter.add_router_transform(block, self._make_counter(n)))
        return self

    def _make_counter(self, n: int) -> Any:
        def count(weights: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self.expert_evals += int((idx < n).sum())
            self.token_layers += int(idx.reshape(-1, idx.shape[-1]).shape[0])
            return weights, idx

        return count

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def evals_per_token(self) -> float | None:
        """Experts evaluated per token per MoE layer (None before any token)."""
        return self.expert_evals / self.token_layers if self.token_layers else None


def encode_prompts(tokenizer: Any, texts: Sequence[str], count: int, max_tokens: int) -> list[torch.Tensor]:
    """``count`` prompts (cycling through ``texts``), each ``[1, <=max_tokens]`` token ids."""
    if not texts:
        raise PipelineError("benchmark.speed.prompts: no prompt texts available (is outputs/corpus/eval empty?)")
    if max_tokens < 1:
        raise PipelineError("benchmark.speed.new_tokens: leaves no room for a prompt in the model's context")
    out = []
    for i in range(count):
        ids = tokenizer(texts[i % len(texts)], return_tensors="pt", add_special_tokens=True)["input_ids"]
        ids = ids[:, -max_tokens:]
        if ids.shape[1] == 0:
            raise PipelineError(f"benchmark.speed: prompt {i} is empty after tokenisation")
        out.append(ids)
    return out


def input_device(model: nn.Module) -> torch.device:
    """Where a model's token ids must go: its input embeddings' device.

    For a model dispatched with a ``device_map`` (accelerate hooks) this is the embeddings' execution
    device, which holds even when their weights are offloaded (and then on the meta device).
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(embeddings, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(f"cuda:{execution}" if isinstance(execution, int) else execution)
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and not weight.is_meta:
        return weight.device
    return next(p.device for p in model.parameters() if not p.is_meta)


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work (on every GPU: a device map may spread the model over several)."""
    if device.type == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


@torch.no_grad()
def _generate_all(model: nn.Module, prompts: Sequence[torch.Tensor], new_tokens: int) -> tuple[int, float]:
    """Greedy-decode every prompt at batch size 1; (new tokens produced, seconds)."""
    from transformers import GenerationConfig

    device = input_device(model)
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    produced = 0
    _sync(device)
    start = time.perf_counter()
    for ids in prompts:
        ids = ids.to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        produced += int(out.shape[1] - ids.shape[1])
    _sync(device)
    return produced, time.perf_counter() - start


@contextlib.contextmanager
def _variant_active(case: SpeedCase, count: bool) -> Iterator[Any]:
    """Dynamic skipping enabled on the case's model for the block (a no-op for other variants).

    The model keeps its experts implementation when that one skips sentinel slots (eager,
    grouped_mm); ``count`` installs the dispatch-counting hooks (off in timed rounds).
    """
    if not case.skip:
        yield None
        return
    from pipeline.skipping import enable

    handle = enable(case.model, case.thresholds, count=count, experts_implementation=None)
    try:
        yield handle
    finally:
        handle.remove()


def measure_speed(
    cases: Sequence[SpeedCase],
    prompts: Sequence[torch.Tensor],
    new_tokens: int,
    repeats: int,
    warmup: int = 1,
) -> dict[str, SpeedResult]:
    """Tokens/s and expert evaluations per token of every case, interleaved and repeated.

    The first untimed round (there is always one, even with ``warmup=0``) counts expert
    evaluations: from the skipping handle's ``stats()`` for skip variants, from router hooks
    otherwise; timed rounds run without any counting hook (skip variants keep only the skip rule).
    """
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate variant names {names}")
    untimed = max(1, warmup)
    runs: dict[str, list[float]] = {c.name: [] for c in cases}
    evals: dict[str, float | None] = {}
    skipped: dict[str, float | None] = {}
    produced_per_run: dict[str, int] = {}
    total = (untimed + repeats) * len(cases)
    with tqdm(total=total, desc="speed", unit="run", leave=False) as bar:
        for round_idx in range(untimed + repeats):
            shift = round_idx % len(cases)
            for case in list(cases[shift:]) + list(cases[:shift]):
                counting = round_idx == 0
                with _variant_active(case, counting) as handle:
                    counter = ExpertCounter(case.model) if counting and not case.skip else contextlib.nullcontext()
                    if handle is not None and counting:
                        handle.reset()
                    with counter:
                        produced, seconds = _generate_all(case.model, prompts, new_tokens)
                    if counting:
                        if handle is not None:
                            stats = handle.stats()
                            evals[case.name] = stats.get("evals_per_token")
                            skipped[case.name] = stats.get("skipped_fraction")
                        else:
                            evals[case.name] = counter.evals_per_token  # type: ignore[union-attr]
                            skipped[case.name] = None
                if round_idx >= untimed:
                    runs[case.name].append(produced / seconds if seconds > 0 else float("nan"))
                    produced_per_run[case.name] = produced
                bar.update(1)
    return {
        c.name: SpeedResult(
            name=c.name,
            tokens_per_s=statistics.median(runs[c.name]),
            runs=runs[c.name],
            new_tokens_per_run=produced_per_run[c.name],
            expert_evals_per_token=evals.get(c.name),
            skipped_fraction=skipped.get(c.name),
        )
        for c in cases
    }
