"""The per-layer search driver: one layer's search with baselines, and both modes with resume.

* **layerwise**: each MoE layer is searched on its cached input from the original model.
* **progressive**: the model is streamed layer by layer; each MoE layer is searched on the input
  produced by the model whose earlier layers are already pruned, then pruned before the stream
  moves on.

Each finished layer is saved as ``layer_<iii>.json`` (+ ``.safetensors`` with the scored candidates)
in a work directory; a restarted run skips (layerwise) or replays (progressive) saved layers, so
its results equal those of an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.config import SearchParams, validate_r
from pipeline.errors import PipelineError
from pipeline.io import load_tensors, read_json, save_tensors, write_json
from pipeline.models.base import MoEAdapter
from pipeline.search import registry
from pipeline.models.outputs import outputs_of
from pipeline.search.reference import reference_losses
from pipeline.search.incremental import LazyScorer
from pipeline.search.scoring import CACHE_BYTES, LayerScorer
from pipeline.search.strategies import LayerProblem
from pipeline.streaming import layer_on_device, stream_layers

log = logging.getLogger(__name__)

#: Relative difference allowed between the fast loss and its direct recomputation (``search.verify``).
VERIFY_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8}
VERIFY_RTOL_LOW_PRECISION = 3e-2
#: Absolute allowance of ``search.verify``: this many epsilons of the block's dtype times ``sum_b ||Z_b||``.
VERIFY_EPS_FACTOR = 16


@dataclass
class LayerResult:
    """One MoE layer's chosen set, its loss, the baselines' sets and losses, and what was scored."""

    layer: int
    strategy: str
    kept: list[int]
    loss: float
    candidates_evaluated: int
    baselines: dict[str, dict[str, Any]]
    usage: list[int]
    reap_scores: list[float]
    verified_loss: float | None
    seconds: float
    candidates: torch.Tensor = field(repr=False)  # [C, r] long
    losses: torch.Tensor = field(repr=False)  # [C] float64
    #: ``search.allocation: global``: the best set and loss found at every size ``top_k..n``
    #: (``[{"r", "kept", "loss"}]``, ascending ``r``; ``n`` keeps all at loss 0) and ``sum_b ||Z_b||_F``.
    curve: list[dict[str, Any]] | None = None
    output_norm: float | None = None

    def record(self) -> dict[str, Any]:
        """The JSON-serialisable part (everything but the candidate table)."""
        extra = {} if self.curve is None else {"curve": self.curve, "output_norm": self.output_norm}
        return {
            **extra,
            "layer": self.layer,
            "strategy": self.strategy,
            "kept": self.kept,
            "loss": self.loss,
            "candidates_evaluated": self.candidates_evaluated,
            "baselines": self.baselines,
            "usage": self.usage,
            "reap_scores": self.reap_scores,
            "verified_loss": self.verified_loss,
            "seconds": self.seconds,
        }


# -- resume files -----------------------------------------------------------------------------------
def _layer_paths(work_dir: Path, layer: int) -> tuple[Path, Path]:
    return work_dir / f"layer_{layer:03d}.json", work_dir / f"layer_{layer:03d}.safetensors"


def save_layer(work_dir: Path, result: LayerResult) -> None:
    """Save a finished layer (tensors first, the JSON last: the JSON marks completion)."""
    meta, tensors = _layer_paths(work_dir, result.layer)
    save_tensors(tensors, {"candidates": result.candidates, "losses": result.losses})
    write_json(meta, result.record())


def load_layer(work_dir: Path | None, layer: int) -> LayerResult | None:
    """A layer saved by an earlier run, or None."""
    if work_dir is None:
        return None
    meta, tensors = _layer_paths(work_dir, layer)
    if not meta.is_file() or not tensors.is_file():
        return None
    rec = read_json(meta, what="saved search layer")
    data = load_tensors(tensors, what="saved search layer")
    return LayerResult(**rec, candidates=data["candidates"], losses=data["losses"])


# -- one layer --------------------------------------------------------------------------------------
def _check_finite(losses: torch.Tensor, layer: int) -> None:
    if not bool(torch.isfinite(losses).all()):
        raise PipelineError(
            f"layer {layer}: the search loss is NaN or infinite (the block overflows in runtime.dtype); "
            "rerun with runtime.dtype float32"
        )


def search_layer(
    adapter: MoEAdapter,
    block: nn.Module,
    config: Any,
    x: torch.Tensor,
    layer: int,
    settings: SearchParams,
    *,
    seq_len: int,
    device: torch.device | str = "cpu",
    spill_dir: Path | None = None,
    cache_bytes: int = CACHE_BYTES,
    progress: Callable[[int], None] | None = None,
) -> LayerResult:
    """Search one MoE block on its input tokens ``x`` (``[N, L, d]`` or ``[N * L, d]``, sequence order).

    ``progress`` is called with the number of sets each scoring step adds.
    """
    started = time.perf_counter()
    n, k, r = adapter.block_num_experts(block), adapter.top_k(config), settings.r
    validate_r(r, n, k)
    strategy = registry.resolve(settings.strategy, n, r, settings.enumerate_budget)
    scorer: LayerScorer | LazyScorer
    if registry.get(strategy).incremental:
        scorer = LazyScorer(
            adapter, block, config, x, tokens_per_batch=settings.loss_batch_size * seq_len,
            token_chunk=settings.token_chunk, device=device,
        )
    else:
        scorer = LayerScorer(
            adapter, block, config, x, tokens_per_batch=settings.loss_batch_size * seq_len,
            token_chunk=settings.token_chunk, device=device, spill_dir=spill_dir, cache_bytes=cache_bytes,
        )
    problem = LayerProblem(scorer, n, settings, layer, progress=progress)
    try:
        result = registry.get(strategy).load()(problem)
        _check_finite(result.losses, layer)
        stats = problem.stats
        found: dict[str, dict[str, Any]] = {}
        for name in settings.baselines:
            picked = registry.get(name).load()(problem)
            found[name] = {"kept": picked.kept, "loss": picked.loss}
    finally:
        scorer.close()
    verified = None
    if settings.verify:
        verified = verify_loss(adapter, block, config, x, result.kept, result.loss, layer, settings, seq_len)
    curve = output_norm = None
    if settings.allocation == "global":
        by_size = {**result.by_size, r: (result.kept, result.loss), n: (list(range(n)), 0.0)}
        curve = [{"r": size, "kept": list(kept), "loss": loss} for size, (kept, loss) in sorted(by_size.items())]
        full = outputs_of(adapter, block, x, settings.loss_batch_size * seq_len)
        output_norm = sum(float(torch.linalg.vector_norm(z.double().reshape(-1))) for z in full)
    return LayerResult(
        layer=layer,
        strategy=strategy,
        kept=result.kept,
        loss=result.loss,
        candidates_evaluated=result.evaluated,
        baselines=found,
        usage=stats.counts.tolist(),
        reap_scores=stats.reap_scores().tolist(),
        verified_loss=verified,
        seconds=round(time.perf_counter() - started, 3),
        candidates=result.candidates,
        losses=result.losses,
        curve=curve,
        output_norm=output_norm,
    )


def verify_loss(
    adapter: MoEAdapter,
    block: nn.Module,
    config: Any,
    x: torch.Tensor,
    kept: Sequence[int],
    loss: float,
    layer: int,
    settings: SearchParams,
    seq_len: int,
) -> float:
    """Recompute the chosen set's loss with the pruned block's own forward; raise if it disagrees.

    Both losses carry rounding error of the order of the dtype's epsilon times the outputs' norm
    (the pruned router renormalises over fewer logits), so the tolerance is relative to the larger
    loss and, for losses near zero (dropped experts almost never routed), to ``sum_b ||Z_b||``.
    """
    tokens = settings.loss_batch_size * seq_len
    full = outputs_of(adapter, block, x, tokens)
    direct = float(reference_losses(adapter, block, config, x, [list(kept)], tokens_per_batch=tokens, layer_idx=layer, full=full)[0])
    dtype = next(block.parameters()).dtype
    rtol = VERIFY_RTOL.get(dtype, VERIFY_RTOL_LOW_PRECISION)
    output_norm = sum(float(torch.linalg.vector_norm(z.double().reshape(-1))) for z in full)
    atol = VERIFY_EPS_FACTOR * torch.finfo(dtype).eps * output_norm
    if abs(direct - loss) > rtol * max(abs(direct), abs(loss)) + atol + 1e-12:
        raise PipelineError(
            f"search.verify: layer {layer}: the fast loss {loss:.6g} of experts {list(kept)} differs from the pruned "
            f"block's own output ({direct:.6g}); the adapter's routing does not reproduce this model "
            "(set search.verify: false to skip the check)"
        )
    return direct


# -- estimate ---------------------------------------------------------------------------------------
def estimate_seconds(
    adapter: MoEAdapter,
    block: nn.Module,
    config: Any,
    x: torch.Tensor,
    settings: SearchParams,
    *,
    seq_len: int,
    num_layers: int,
    device: torch.device | str = "cpu",
    probe_fraction: int = 16,
) -> tuple[str, int, float]:
    """``(strategy, candidates per layer, estimated seconds for all layers)`` from timed probes.

    The layer's whole search (:func:`search_layer`: strategy, baselines, verify) runs on its first
    ``1/probe_fraction`` of the sequences and on twice that (the smaller one twice, the faster
    counted: the first run pays warm-up); the time per layer is extrapolated linearly in the number of
    sequences (a fixed part plus a part per sequence), times ``num_layers``.
    """
    n, k, r = adapter.block_num_experts(block), adapter.top_k(config), settings.r
    validate_r(r, n, k)
    strategy = registry.resolve(settings.strategy, n, r, settings.enumerate_budget)
    planned = registry.planned_candidates(strategy, n, r, settings) + len(settings.baselines)
    seqs = x.reshape(-1, seq_len, x.shape[-1])
    total = seqs.shape[0]
    small = max(1, total // probe_fraction)
    large = min(total, 2 * small)

    def probe(count: int) -> float:
        started = time.perf_counter()
        search_layer(adapter, block, config, seqs[:count], 0, settings, seq_len=seq_len, device=device)
        return time.perf_counter() - started

    t_small = probe(small)
    t_large = probe(large)
    t_small = min(t_small, probe(small))
    slope = (t_large - t_small) / (large - small) if large > small else 0.0
    if slope <= 0.0:  # one sample size, or noise larger than the difference: proportional
        per_layer = max(t_small, t_large) * total / large
    else:
        per_layer = max(0.0, t_small - slope * small) + slope * total
    return strategy, planned, per_layer * num_layers


# -- both modes ---------------------------------------------------------------------------------------
LayerCallback = Callable[[LayerResult, bool], None]


def _layer_bar(layer: int, strategy: str, planned: int) -> Any:
    """A progress bar over one layer's scored sets, with an ETA (shown on a terminal only, as tqdm decides)."""
    return tqdm(total=planned, desc=f"search layer {layer} ({strategy})", unit="set", leave=False, disable=None, mininterval=1.0)


def _spill(work_dir: Path | None) -> Path | None:
    return None if work_dir is None else work_dir / "spill"


def _announce(
    strategy: str, planned: int, layers: int, seconds: float, settings: SearchParams, n: int, device: torch.device | str
) -> None:
    if settings.strategy == "auto":
        how = f"{strategy} (auto: C({n}, {settings.r}) = {math.comb(n, settings.r)}, enumerate_budget {settings.enumerate_budget})"
    else:
        how = strategy
    log.info(
        "search: %s; keep %d of %d experts; %d candidates per layer + %d baselines, %d layers; estimated %.3g s on %s",
        how, settings.r, n, planned - len(settings.baselines), len(settings.baselines), layers, seconds, device,
    )


def run_layerwise(
    model: nn.Module,
    adapter: MoEAdapter,
    config: Any,
    layers: Sequence[int],
    load: Callable[[int], torch.Tensor],
    settings: SearchParams,
    *,
    device: torch.device | str = "cpu",
    work_dir: Path | None = None,
    on_layer: LayerCallback | None = None,
) -> list[LayerResult]:
    """Search every MoE layer in ``layers`` on its cached input ``load(i)`` ``[N, L, d]``."""
    decoder = adapter.decoder_layers(model)
    results: list[LayerResult] = []
    announced = False
    for i in layers:
        saved = load_layer(work_dir, i)
        if saved is not None:
            log.info("search: layer %d already done (resumed from %s)", i, work_dir)
            results.append(saved)
            if on_layer:
                on_layer(saved, True)
            continue
        if adapter.moe_block(decoder[i]) is None:
            raise PipelineError(f"layer {i} of the model has no MoE block, but the activation cache lists it")
        x = load(i)
        if x.dim() != 3:
            raise PipelineError(f"activations of layer {i} have shape {tuple(x.shape)}, expected [samples, seq_len, hidden]")
        with layer_on_device(model, i, decoder[i], torch.device(device)) as layer:
            block = adapter.moe_block(layer)
            if not announced:
                strategy, planned, seconds = estimate_seconds(
                    adapter, block, config, x, settings, seq_len=x.shape[1], num_layers=len(layers) - len(results), device=device
                )
                _announce(strategy, planned, len(layers), seconds, settings, adapter.block_num_experts(block), device)
                announced = True
            with _layer_bar(i, strategy, planned) as bar:
                result = search_layer(
                    adapter, block, config, x, i, settings, seq_len=x.shape[1], device=device, spill_dir=_spill(work_dir),
                    progress=bar.update,
                )
        del x
        if work_dir is not None:
            save_layer(work_dir, result)
        results.append(result)
        if on_layer:
            on_layer(result, False)
    return results


def run_progressive(
    model: nn.Module,
    adapter: MoEAdapter,
    config: Any,
    input_ids: torch.Tensor,
    settings: SearchParams,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    work_dir: Path | None = None,
    on_layer: LayerCallback | None = None,
) -> list[LayerResult]:
    """Search each MoE layer on the input of the model whose earlier MoE layers are already pruned.

    The model's MoE blocks are replaced in place by their pruned versions.
    """
    device = torch.device(device)
    seq_len = int(input_ids.shape[1])
    moe_layers = adapter.moe_layer_indices(model)
    pruned_config = None
    results: list[LayerResult] = []
    announced = False
    for step in stream_layers(model, adapter, input_ids, batch_size=batch_size, device=device, desc="search"):
        if step.block is None:
            continue
        result = load_layer(work_dir, step.index)
        resumed = result is not None
        if result is None:
            x = step.moe_tokens()
            if not announced:
                strategy, planned, seconds = estimate_seconds(
                    adapter, step.block, config, x, settings, seq_len=seq_len,
                    num_layers=len(moe_layers) - len(results), device=device,
                )
                _announce(
                    strategy, planned, len(moe_layers), seconds, settings, adapter.block_num_experts(step.block), device
                )
                announced = True
            with _layer_bar(step.index, strategy, planned) as bar:
                result = search_layer(
                    adapter, step.block, config, x, step.index, settings, seq_len=seq_len, device=device,
                    spill_dir=_spill(work_dir), progress=bar.update,
                )
            del x
            if work_dir is not None:
                save_layer(work_dir, result)
        else:
            log.info("search: layer %d already done (replaying its selection from %s)", step.index, work_dir)
        if pruned_config is None:
            pruned_config = adapter.pruned_config(config, settings.r)
        step.replace_block(adapter, adapter.prune_block(step.block, result.kept, pruned_config, step.index))
        results.append(result)
        if on_layer:
            on_layer(result, resumed)
    return results


@torch.no_grad()
def routing_usage(
    model: nn.Module, adapter: MoEAdapter, config: Any, input_ids: torch.Tensor, *, batch_size: int, device: torch.device | str
) -> dict[int, list[int]]:
    """Routing slots taken by each expert of each MoE layer when the model reads ``input_ids``."""
    usage: dict[int, list[int]] = {}
    for step in stream_layers(model, adapter, input_ids, batch_size=batch_size, device=torch.device(device), desc="usage"):
        if step.block is None:
            continue
        counts = torch.zeros(adapter.block_num_experts(step.block), dtype=torch.long)
        for xb in step.moe_input:
            tokens = xb.reshape(-1, xb.shape[-1])
            _, ids = adapter.route(step.block, adapter.router_logits(step.block, tokens), config)
            counts += torch.bincount(ids.reshape(-1).cpu(), minlength=counts.numel())
        usage[step.index] = counts.tolist()
    return usage
