"""Dynamic expert skipping: drop a token's low-weight routed experts at run time (Lu et al., 2024).

The rule (also in docs/skipping.md). For one token, sort its top-k routing weights descending,
``w(1) >= ... >= w(k)``, and let ``head(i) = w(1) + ... + w(i)``, ``tail(i) = w(i+1) + ... + w(k)``.

- Calibration statistic: ``rho = tail(k-1) / head(k-1) = w(k) / (w(1) + ... + w(k-1))``; for top-2
  this is the paper's ``w2 / w1``. A layer's threshold ``beta`` is the ``quantile`` (paper: median)
  of ``rho`` over the calibration tokens, measured on the model the thresholds are for.
- Run time: keep the first ``i`` experts, where ``i`` is the smallest index in ``1..k-1`` with
  ``tail(i) / head(i) < beta`` (keep all ``k`` when there is none). The kept weights are rescaled to
  sum to the original total ``head(k)``, so for a renormalising top-2 router (Mixtral) a token that
  skips its second expert uses the first with weight 1, as in the paper.

Properties: ``beta = 0`` changes nothing; ``beta = inf`` (or any value above every ratio) is top-1
routing with the total weight on the best expert. Because ``tail(i)/head(i) >= rho`` for every
``i``, a token skips at least one expert exactly when ``rho < beta``, so the calibration quantile
``q`` skips the last expert of a fraction ``q`` of calibration-like tokens (about half with the
median). method.md states the rule with the tail share ``tail(i) / head(k)``; since
``tail/total = ratio / (1 + ratio)`` is increasing in the ratio, both forms make the same decisions
with ``beta_share = beta / (1 + beta)``; the ratio form makes ``beta`` for top-2 the paper's.

Skipped slots are rewritten to the sentinel expert id ``n`` (the block's expert count) with weight 0
by a router hook (``adapter.add_router_transform``). transformers' ``eager`` experts loop skips
sentinel slots, so those experts are never computed; the grouped/batched kernels honour sentinels
only under expert parallelism, so :func:`enable` switches the model to the ``eager`` experts
implementation (unless every threshold is 0, which skips nothing) and restores the previous one on
removal. Every MoE block's experts module is
hooked to count the (token, expert) pairs it actually receives.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, dumps_json, read_json
from pipeline.models.base import MoEAdapter, RouterTransform
from pipeline.models.registry import get_adapter
from pipeline.streaming import stream_layers

log = logging.getLogger(__name__)

#: Config key holding the per-layer thresholds (``{"<layer>": beta}``) in a skip-enabled checkpoint.
CONFIG_KEY = "expert_skip_thresholds"
#: Short name of the rule, recorded with the thresholds.
RULE = (
    "ratio: keep the first i experts, smallest i with sum(w[i+1:k]) / sum(w[1:i]) < beta; "
    "beta = quantile of w_k / sum(w[1:k-1])"
)
#: Experts implementation whose dispatch loop skips sentinel slots.
EAGER = "eager"
#: Experts implementations that do not compute sentinel slots: the eager loop (families with
#: ``eager_handles_sentinel``) and transformers' ``grouped_mm`` (sorts sentinels to the tail and stops
#: the grouped GEMM before them, while the router-transform handle sets the experts' expert-parallel
#: flag). ``batched_mm`` computes them with weight 0, so it brings no saving.
SKIPPING_IMPLEMENTATIONS = (EAGER, "grouped_mm")


# -- the rule --------------------------------------------------------------------------------------
def tail_head_ratios(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted weights, the sort order and ``tail(i) / head(i)`` for ``i = 1..k-1``.

    ``weights`` ``[T, k]`` -> ``(sorted [T, k] descending, order [T, k], ratios [T, k-1])``, in float32.
    """
    w = weights.float()
    sorted_w, order = torch.sort(w, dim=-1, descending=True, stable=True)
    head = torch.cumsum(sorted_w, dim=-1)[:, :-1]
    tail = torch.flip(torch.cumsum(torch.flip(sorted_w, dims=[-1]), dim=-1), dims=[-1])[:, 1:]
    return sorted_w, order, tail / head.clamp_min(torch.finfo(torch.float32).tiny)


def calibration_statistic(weights: torch.Tensor) -> torch.Tensor:
    """Per token ``rho = w(k) / (w(1) + ... + w(k-1))`` ``[T]``; for top-2, ``w2 / w1``."""
    if weights.shape[-1] < 2:
        raise PipelineError("expert skipping needs top_k >= 2 (a top-1 model has nothing to skip)")
    return tail_head_ratios(weights)[2][:, -1]


def threshold(statistic: torch.Tensor, quantile: float) -> float:
    """The ``quantile`` of ``statistic`` (linear interpolation), as the layer's ``beta``."""
    values = statistic.detach().double().cpu().numpy()
    if values.size == 0:
        raise PipelineError("no calibration tokens to compute a skip threshold from")
    return float(np.quantile(values, quantile))


def _kept_from_ratios(ratios: torch.Tensor, k: int, beta: float) -> torch.Tensor:
    below = ratios < beta
    first = torch.argmax(below.to(torch.int8), dim=-1) + 1  # smallest i with ratio(i) < beta
    return torch.where(below.any(dim=-1), first, torch.full_like(first, k))


def kept_counts(weights: torch.Tensor, beta: float) -> torch.Tensor:
    """Experts each token keeps under threshold ``beta`` ``[T]`` (1..k)."""
    k = weights.shape[-1]
    if k < 2:
        return torch.ones(weights.shape[0], dtype=torch.long, device=weights.device)
    return _kept_from_ratios(tail_head_ratios(weights)[2], k, beta)


def skip_routing(
    weights: torch.Tensor, indices: torch.Tensor, beta: float, sentinel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the skip rule to one block's routing ``[T, k]``.

    Skipped slots get index ``sentinel`` and weight 0; kept weights of a token that skipped are
    rescaled to its original total; tokens that skip nothing keep their weights bit for bit.
    Slot order is unchanged.
    """
    return skipper(beta, sentinel)(weights, indices)


def skipper(beta: float, sentinel: int) -> RouterTransform:
    """:func:`skip_routing` with ``beta`` and ``sentinel`` bound: the router transform :func:`enable` installs.

    Every path makes the same decisions and weights bit for bit. Top-2 float32 routing on the CPU
    (decoding on a CPU) is decided with NumPy on the tensors' own memory, which costs a few
    microseconds, against tens for the equivalent torch ops; a call where no token skips returns
    its inputs. Other top-2 routing takes elementwise torch ops without host synchronisation,
    top-k > 2 the sorted general rule.
    """
    if beta <= 0:
        return _unchanged
    with np.errstate(over="ignore"):
        beta32 = np.float32(beta)  # the comparison is in float32, as torch's ``ratio < beta``

    def transform(weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = weights.shape[-1]
        if k < 2:
            return weights, indices
        if k > 2:
            return _skip_sorted(weights, indices, beta, sentinel)
        if weights.dtype == torch.float32 and weights.is_cpu and not weights.requires_grad:
            return _skip_top2_host(weights, indices, beta32, sentinel)
        return _skip_top2(weights, indices, beta, sentinel)

    return transform


def _unchanged(weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return weights, indices


def _skip_sorted(
    weights: torch.Tensor, indices: torch.Tensor, beta: float, sentinel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`skip_routing` for any ``k`` from the sorted weights."""
    k = weights.shape[-1]
    sorted_w, order, ratios = tail_head_ratios(weights)
    n_kept = _kept_from_ratios(ratios, k, beta)
    skips = n_kept < k
    keep_sorted = torch.arange(k, device=weights.device).unsqueeze(0) < n_kept.unsqueeze(-1)
    kept_sum = (sorted_w * keep_sorted).sum(dim=-1, keepdim=True)
    scale = sorted_w.sum(dim=-1, keepdim=True) / kept_sum.clamp_min(torch.finfo(torch.float32).tiny)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    rescaled = (weights.float() * scale).to(weights.dtype)
    new_w = torch.where(skips.unsqueeze(-1), rescaled, weights)
    new_w = torch.where(keep, new_w, torch.zeros_like(new_w))
    new_idx = torch.where(keep, indices, torch.full_like(indices, sentinel))
    return new_w, new_idx


_TINY = torch.finfo(torch.float32).tiny
_TINY32 = np.float32(_TINY)


def _skip_top2(
    weights: torch.Tensor, indices: torch.Tensor, beta: float, sentinel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`skip_routing` for top-2 in about a dozen elementwise ops (no sort, no cumsum, no host sync).

    The same float32 arithmetic as the general path, so decisions and weights are bit-identical:
    the head is the larger weight ``hi`` (the first slot on ties, as the stable descending sort has
    it: ``argmax`` returns the first maximum), the tail the smaller ``lo``; a token skips when
    ``lo / hi < beta``, and its kept weight is rescaled by ``(hi + lo) / hi``.
    """
    w = weights.float()
    lo, hi = torch.aminmax(w, dim=-1)
    hi_c = hi.clamp_min(_TINY)
    skip = (lo / hi_c < beta).unsqueeze(-1)
    rescaled = (w * ((hi + lo) / hi_c).unsqueeze(-1)).to(weights.dtype)
    drop = (_slots2(w.device) != w.argmax(-1, keepdim=True)) & skip
    new_w = torch.where(skip, rescaled, weights).masked_fill_(drop, 0)
    return new_w, indices.masked_fill(drop, sentinel)


def _skip_top2_host(
    weights: torch.Tensor, indices: torch.Tensor, beta: np.float32, sentinel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_skip_top2` on CPU float32 tensors, in NumPy (IEEE float32 like torch: the same bits)."""
    w = weights.numpy()
    first, second = w[..., 0], w[..., 1]
    hi = np.maximum(first, second)
    lo = np.minimum(first, second)
    hi_c = np.maximum(hi, _TINY32)
    skip = lo / hi_c < beta
    if not skip.any():
        return weights, indices
    keep_second = second > first  # the first slot is kept on ties, as argmax has it
    drop = np.empty(w.shape, dtype=bool)
    np.logical_and(skip, keep_second, out=drop[..., 0])
    np.greater(skip, keep_second, out=drop[..., 1])  # skip and not keep_second
    new_w = w.copy()
    np.multiply(w, ((hi + lo) / hi_c)[..., None], out=new_w, where=skip[..., None])
    new_w[drop] = 0
    new_idx = indices.numpy().copy()
    new_idx[drop] = sentinel
    return torch.from_numpy(new_w), torch.from_numpy(new_idx)


_SLOTS2: dict[torch.device, torch.Tensor] = {}


def _slots2(device: torch.device) -> torch.Tensor:
    """``[0, 1]`` on ``device``, made once (a per-call host-to-device copy would stall a GPU queue)."""
    slots = _SLOTS2.get(device)
    if slots is None:
        slots = _SLOTS2[device] = torch.arange(2, device=device)
    return slots


# -- thresholds ------------------------------------------------------------------------------------
def resolve_thresholds(
    model: nn.Module, adapter: MoEAdapter, thresholds: Mapping[Any, float] | Sequence[float] | None
) -> dict[int, float]:
    """Per-MoE-layer ``beta`` from a mapping (layer -> beta), a sequence (MoE layer order) or the config.

    A count of layers that differs from the model's MoE layers, or a negative/NaN value, is a
    one-line error.
    """
    layers = adapter.moe_layer_indices(model)
    origin = "thresholds"
    if thresholds is None:
        thresholds = getattr(model.config, CONFIG_KEY, None)
        origin = f"config.{CONFIG_KEY}"
        if thresholds is None:
            raise PipelineError(
                f"the model's config has no {CONFIG_KEY}: pass thresholds (outputs/skip/thresholds.json) "
                "or load the skip-enabled checkpoint outputs/skip/model"
            )
    if isinstance(thresholds, Mapping):
        try:
            values = {int(k): float(v) for k, v in thresholds.items()}
        except (TypeError, ValueError):
            raise PipelineError(f"{origin}: keys must be layer indices and values numbers") from None
        if sorted(values) != layers:
            raise PipelineError(
                f"{origin}: has thresholds for {len(values)} layers {sorted(values)}, "
                f"the model's {len(layers)} MoE layers are {layers}"
            )
    elif isinstance(thresholds, Sequence) and not isinstance(thresholds, str):
        if len(thresholds) != len(layers):
            raise PipelineError(
                f"{origin}: has {len(thresholds)} thresholds, the model has {len(layers)} MoE layers {layers}"
            )
        values = {layer: float(v) for layer, v in zip(layers, thresholds, strict=True)}
    else:
        raise PipelineError(f"{origin}: expected a mapping layer -> threshold or a list, got {type(thresholds).__name__}")
    for layer, beta in values.items():
        if math.isnan(beta) or beta < 0:
            raise PipelineError(f"{origin}: threshold of layer {layer} must be >= 0 (got {beta})")
    return values


def load_thresholds(path: str | os.PathLike[str], variant: str = "pruned") -> dict[int, float]:
    """``{layer: beta}`` of ``variant`` (``pruned`` or ``original``) from ``thresholds.json``."""
    data = read_json(path, what="thresholds file")
    table = data.get(variant) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise PipelineError(f"thresholds file {path} has no {variant!r} thresholds")
    try:
        return {int(k): float(v) for k, v in table.items()}
    except (TypeError, ValueError):
        raise PipelineError(f"thresholds file {path}: {variant!r} must map layer indices to numbers") from None


@torch.no_grad()
def calibrate_thresholds(
    model: nn.Module,
    adapter: MoEAdapter,
    input_ids: torch.Tensor,
    quantile: float,
    batch_size: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[int, float]:
    """Per-MoE-layer ``beta``: the ``quantile`` of ``rho`` over the calibration tokens ``input_ids``.

    Each layer's router weights come from its own block input in the unmodified model, streamed
    one layer at a time (``pipeline.streaming.stream_layers``).
    """
    if not 0.0 <= quantile <= 1.0:
        raise PipelineError(f"skip.quantile: must be in [0, 1] (got {quantile})")
    if adapter.top_k(model.config) < 2:
        raise PipelineError("expert skipping needs top_k >= 2 (a top-1 model has nothing to skip)")
    out: dict[int, float] = {}
    device = torch.device(device)
    stream = stream_layers(
        model, adapter, input_ids, batch_size=batch_size, device=device, progress=progress, desc="skip thresholds"
    )
    for step in stream:
        if step.block is None:
            continue
        stats = []
        for x in step.moe_input:
            tokens = x.reshape(-1, x.shape[-1])
            weights, _ = adapter.route(step.block, adapter.router_logits(step.block, tokens), model.config)
            stats.append(calibration_statistic(weights).cpu())
        out[step.index] = threshold(torch.cat(stats), quantile)
    return out


# -- run time --------------------------------------------------------------------------------------
@dataclass
class _Totals:
    evals: int = 0
    tokens: int = 0
    slots: int = 0
    second_skipped: int = 0
    last_skipped: int = 0

    def add(self, other: _Totals) -> None:
        self.evals += other.evals
        self.tokens += other.tokens
        self.slots += other.slots
        self.second_skipped += other.second_skipped
        self.last_skipped += other.last_skipped

    def as_dict(self, top_k: int) -> dict[str, float]:
        return {
            "expert_evals": self.evals,
            "tokens": self.tokens,
            "evals_per_token": self.evals / self.tokens if self.tokens else 0.0,
            "skipped_fraction": 1.0 - self.evals / self.slots if self.slots else 0.0,
            "second_expert_skipped_fraction": self.second_skipped / self.tokens if self.tokens and top_k >= 2 else 0.0,
            "last_expert_skipped_fraction": self.last_skipped / self.tokens if self.tokens else 0.0,
        }


class _Counter:
    """One MoE layer's dispatch counts: a histogram of experts computed per token, kept on the device.

    Updating it is a few elementwise kernels with no host synchronisation (decoding keeps the GPU
    queue full); :meth:`totals` reads it back.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.slots = 0
        self._hist: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, idx: torch.Tensor, n: int, tokens: int) -> None:
        k = idx.shape[-1]
        key = (idx.device, k)
        if key not in self._hist:
            levels = torch.arange(k + 1, device=idx.device)
            self._hist[key] = (levels, torch.zeros(k + 1, dtype=torch.long, device=idx.device))
        levels, hist = self._hist[key]
        per_token = ((idx >= 0) & (idx < n)).sum(-1).reshape(-1, 1)
        hist += (per_token == levels).sum(0)
        self.tokens += tokens
        self.slots += idx.numel()

    def totals(self) -> _Totals:
        out = _Totals(tokens=self.tokens, slots=self.slots)
        for (_, k), (_, hist) in self._hist.items():
            counts = hist.tolist()
            out.evals += sum(c * v for c, v in enumerate(counts))
            out.second_skipped += sum(counts[:2])
            out.last_skipped += sum(counts[:k])
        return out

    def reset(self) -> None:
        self.tokens = self.slots = 0
        self._hist.clear()


def _routing_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
    if len(values) < 2:
        raise RuntimeError("the experts module was called without routing indices; it is not supported by skipping")
    return values[0], values[1]


class SkipHandle:
    """Skipping (or only counting) installed on a model's MoE blocks; see :func:`enable`.

    ``stats()`` counts the (token, expert) pairs the experts modules actually received since the
    last ``reset()``: ``expert_evals``, ``tokens`` (token-layer pairs), ``evals_per_token`` (per MoE
    layer, at most top_k), ``skipped_fraction`` (of all top-k slots), ``second_expert_skipped_fraction``
    and ``last_expert_skipped_fraction`` (of tokens), and the same per layer under ``layers``.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: MoEAdapter,
        thresholds: Mapping[int, float] | None,
        *,
        count: bool = True,
        experts_implementation: str | None = EAGER,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.thresholds = dict(thresholds) if thresholds is not None else None
        self.count = count
        self.experts_implementation = experts_implementation
        self.top_k = adapter.top_k(model.config)
        self._counters: dict[int, _Counter] = {}
        self._handles: list[Any] = []
        self._restore: list[tuple[Any, Any]] = []
        self._active = False

    # -- installation ----------------------------------------------------------------------------
    def _install(self) -> None:
        layers = self.adapter.decoder_layers(self.model)
        if self.thresholds is not None and any(b > 0 for b in self.thresholds.values()):
            self._use_skipping_implementation()  # all-zero thresholds skip nothing: the implementation can stay
        try:
            for i in self.adapter.moe_layer_indices(self.model):
                block = self.adapter.moe_block(layers[i])
                n = self.adapter.block_num_experts(block)
                self._counters[i] = _Counter()
                if self.thresholds is not None:
                    beta = self.thresholds[i]
                    self._handles.append(
                        self.adapter.add_router_transform(block, skipper(beta, n))
                    )
                if self.count:
                    experts = getattr(block, self.adapter.experts_attr)
                    self._handles.append(experts.register_forward_pre_hook(self._count_hook(i, n), with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        self._active = True

    def _target_implementation(self, current: str | None) -> str:
        if self.experts_implementation is not None:
            return self.experts_implementation
        return current if current in SKIPPING_IMPLEMENTATIONS else EAGER

    def _use_skipping_implementation(self) -> None:
        """Switch every experts module to an implementation that does not compute skipped slots.

        ``experts_implementation`` names it (default: eager); None keeps the model's own when it is
        one of :data:`SKIPPING_IMPLEMENTATIONS`, else eager.
        """
        setter = getattr(self.model, "set_experts_implementation", None)
        current = getattr(self.model.config, "_experts_implementation", None)
        target = self._target_implementation(current)
        if callable(setter) and current is not None and current != target:
            previous = self.model.get_experts_implementation()
            setter(target)
            self._restore.append((self.model, previous))
        # Blocks built from another config object (e.g. replaced in memory) are switched one by one.
        layers = self.adapter.decoder_layers(self.model)
        for i in self.adapter.moe_layer_indices(self.model):
            experts = getattr(self.adapter.moe_block(layers[i]), self.adapter.experts_attr)
            cfg = getattr(experts, "config", None)
            current = getattr(cfg, "_experts_implementation", None)
            if cfg is not None and current is not None and current != self._target_implementation(current):
                self._restore.append((cfg, current))
                cfg._experts_implementation_internal = self._target_implementation(current)

    def _count_hook(self, layer: int, n: int) -> Any:
        counter = self._counters[layer]

        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden, idx = _routing_args(args, kwargs)
            counter.add(idx, n, int(hidden.shape[0]))

        return hook

    # -- public ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counts since the last reset, over all MoE layers and per layer (empty without counting)."""
        total = _Totals()
        layers = {}
        for i, c in self._counters.items():
            layer = c.totals()
            total.add(layer)
            layers[str(i)] = layer.as_dict(self.top_k)
        out: dict[str, Any] = total.as_dict(self.top_k)
        out["layers"] = layers
        return out

    def reset(self) -> None:
        """Zero the counters."""
        for c in self._counters.values():
            c.reset()

    def remove(self) -> None:
        """Uninstall every hook and restore the previous experts implementation."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for target, previous in reversed(self._restore):
            if isinstance(target, nn.Module):
                target.set_experts_implementation(previous)
            else:
                target._experts_implementation_internal = previous
        self._restore.clear()
        self._active = False

    @property
    def active(self) -> bool:
        """Whether the hooks are installed."""
        return self._active

    def __enter__(self) -> SkipHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def enable(
    model: nn.Module,
    thresholds: Mapping[Any, float] | Sequence[float] | None = None,
    adapter: MoEAdapter | None = None,
    *,
    count: bool = True,
    experts_implementation: str | None = EAGER,
) -> SkipHandle:
    """Make every MoE block send each token only to the experts it keeps under the skip rule.

    ``thresholds``: ``{layer: beta}`` or a list in MoE-layer order; None reads
    ``model.config.expert_skip_thresholds`` (a checkpoint from the skip_calibration stage). Works on
    any model loaded with plain transformers. Returns a handle (also a context manager) whose
    ``stats()`` counts the expert evaluations actually dispatched (``count=False``: no counting
    hooks, for timed runs; ``stats()`` is then all zeros); ``remove()`` undoes everything.
    ``experts_implementation``: the transformers experts implementation to run while skipping
    (default ``eager``); None keeps the model's own if it does not compute skipped slots
    (:data:`SKIPPING_IMPLEMENTATIONS`, e.g. ``grouped_mm`` on a GPU), else switches to eager.
    """
    adapter = adapter or get_adapter(model.config)
    values = resolve_thresholds(model, adapter, thresholds)
    handle = SkipHandle(model, adapter, values, count=count, experts_implementation=experts_implementation)
    handle._install()
    return handle


def count_dispatch(model: nn.Module, adapter: MoEAdapter | None = None) -> SkipHandle:
    """Count dispatched expert evaluations without skipping (nor changing the experts implementation)."""
    handle = SkipHandle(model, adapter or get_adapter(model.config), None)
    handle._install()
    return handle


@torch.no_grad()
def measure_skipping(
    model: nn.Module,
    adapter: MoEAdapter,
    input_ids: torch.Tensor,
    thresholds: Mapping[Any, float] | Sequence[float] | None,
    batch_size: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the model's decoder layers on ``input_ids`` with skipping on; return the handle's stats.

    Layers are streamed one at a time (the skipped routing of earlier layers feeds later ones, as
    in a full forward pass), so the whole model need not fit on ``device``.
    """
    with enable(model, thresholds, adapter) as handle:
        device = torch.device(device)
        for _ in stream_layers(
            model, adapter, input_ids, batch_size=batch_size, device=device, progress=progress, desc="skip measure"
        ):
            pass
        return handle.stats()


# -- the skip-enabled checkpoint -------------------------------------------------------------------
def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_skip_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], thresholds: Mapping[int, float]) -> None:
    """Copy checkpoint ``src`` to ``dst`` with ``expert_skip_thresholds`` added to its config.

    Weight files are hard-linked (copied when links are impossible), other files copied; the
    model card gets a section on the thresholds. ``dst`` is replaced atomically.
    """
    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    config = read_json(config_path, what="exported model config")
    values = {str(k): float(v) for k, v in sorted(thresholds.items())}
    layers = config.get("kept_experts")
    if isinstance(layers, dict) and sorted(layers, key=int) != list(values):
        raise PipelineError(
            f"thresholds: {len(values)} layers {list(values)} do not match the {len(layers)} MoE layers "
            f"{sorted(layers, key=int)} of {src}"
        )
    with atomic_dir(dst) as tmp:
        for item in sorted(src.iterdir()):
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            elif item.suffix == ".safetensors":
                _link_or_copy(item, tmp / item.name)
            elif item.name not in ("config.json", "README.md"):
                shutil.copy2(item, tmp / item.name)
        config[CONFIG_KEY] = values
        (tmp / "config.json").write_text(dumps_json(config), encoding="utf-8")
        card = (src / "README.md").read_text(encoding="utf-8") if (src / "README.md").is_file() else ""
        rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in values.items())
        card += (
            "\n## Dynamic expert skipping\n\n"
            f"`config.json` holds per-layer thresholds under `{CONFIG_KEY}` (rule: {RULE}). "
            "`pipeline.skipping.enable(model)` switches skipping on.\n\n"
            f"| layer | beta |\n|---|---:|\n{rows}\n"
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")


__all__ = [
    "CONFIG_KEY",
    "RULE",
    "SKIPPING_IMPLEMENTATIONS",
    "SkipHandle",
    "calibrate_thresholds",
    "calibration_statistic",
    "count_dispatch",
    "enable",
    "kept_counts",
    "load_thresholds",
    "measure_skipping",
    "resolve_thresholds",
    "skip_routing",
    "skipper",
    "tail_head_ratios",
    "threshold",
    "write_skip_checkpoint",
]
