"""Physically remove pruned experts and save a standard Hugging Face checkpoint.

The model is pruned in place, one MoE layer at a time (the router's rows and the experts of the
kept set are sliced by the adapter), so peak memory is one copy of the model plus one layer. The
saved checkpoint sets the config's expert count to ``r``, keeps ``top_k``, and records the kept
original expert ids (``kept_experts``) and how they were chosen (``pruning``) in ``config.json``;
it loads with ``AutoModelForCausalLM.from_pretrained`` and no custom code.

Optionally (``merge``) a second checkpoint folds every dropped expert into a kept one
(:mod:`pipeline.merging`), same layout, recording what went where in ``merged_experts``; and
``top_k`` lowers the experts per token of both (static top-k reduction, the family's routing rule).

Equivalence check: given each MoE layer's cached inputs ``X``, the pruned block's own forward is
compared with ``Z_hat(S)`` computed the way the search scores a kept set (the adapter's ``route``
with ``kept`` plus the unweighted expert outputs, plus any shared-expert part). A mismatch means
the search optimised a different model from the one shipped, and is an error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, dumps_json, read_json, sha256_bytes
from pipeline.merging import METHODS as MERGE_METHODS
from pipeline.merging import LayerMerge, apply_merge, merge_layer
from pipeline.models.base import MoEAdapter
from pipeline.models.loading import COUNTS_KEY
from pipeline.models.outputs import block_outputs, search_output
from pipeline.offload import detach_layer_source, layer_source

log = logging.getLogger(__name__)

#: Config keys the export adds to ``config.json``.
KEPT_KEY = "kept_experts"
PRUNING_KEY = "pruning"
#: Config keys of the merged checkpoint: ``{"<layer>": {"<kept id>": {"<original id>": weight}}}`` and how.
MERGED_KEY = "merged_experts"
MERGING_KEY = "merging"

#: Relative Frobenius error allowed between the exported block and ``Z_hat(S)``, per dtype.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


# -- the selection ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """The search's choice: which original experts each MoE layer keeps (``selection.json``)."""

    r: int
    num_experts: int
    top_k: int
    kept: dict[int, list[int]]
    strategy: str = "unknown"
    mode: str = "unknown"
    calibration: str | None = None
    model_fingerprint: str | None = None
    losses: dict[int, float] = field(default_factory=dict)
    baselines: dict[int, dict[str, Any]] = field(default_factory=dict)
    sha256: str = ""
    origin: str = "selection"
    loss_batch_size: int = 1
    #: ``uniform`` (``r`` experts in every layer) or ``global`` (``r`` on average, per-layer counts).
    allocation: str = "uniform"

    @property
    def counts(self) -> dict[int, int]:
        """Experts each MoE layer keeps."""
        return {layer: len(ids) for layer, ids in self.kept.items()}

    @property
    def uniform(self) -> bool:
        """Whether every layer keeps the same number of experts."""
        return len(set(self.counts.values())) <= 1

    @classmethod
    def from_dict(cls, data: Any, origin: str = "selection", sha256: str | None = None) -> Selection:
        """Parse the documented ``selection.json`` layout; a malformed file is a one-line error."""
        if not isinstance(data, Mapping):
            raise PipelineError(f"{origin}: must be a JSON object, got {type(data).__name__}")
        for key in ("r", "num_experts", "top_k", "layers"):
            if key not in data:
                raise PipelineError(f"{origin}: missing key {key!r}")
        r, n, k = data["r"], data["num_experts"], data["top_k"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (r, n, k)):
            raise PipelineError(f"{origin}: r, num_experts and top_k must be integers")
        layers = data["layers"]
        if not isinstance(layers, list) or not layers:
            raise PipelineError(f"{origin}: 'layers' must be a non-empty list")
        kept: dict[int, list[int]] = {}
        losses: dict[int, float] = {}
        baselines: dict[int, dict[str, Any]] = {}
        for entry in layers:
            if not isinstance(entry, Mapping) or "layer" not in entry or "kept" not in entry:
                raise PipelineError(f"{origin}: every entry of 'layers' needs 'layer' and 'kept'")
            layer, ids = entry["layer"], entry["kept"]
            if not isinstance(layer, int) or isinstance(layer, bool):
                raise PipelineError(f"{origin}: layer {layer!r} is not an integer")
            if layer in kept:
                raise PipelineError(f"{origin}: layer {layer} is listed twice")
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise PipelineError(f"{origin}: layer {layer}: 'kept' must be a list of expert ids")
            kept[layer] = sorted(ids)
            if isinstance(entry.get("loss"), int | float):
                losses[layer] = float(entry["loss"])
            if isinstance(entry.get("baselines"), Mapping):
                baselines[layer] = dict(entry["baselines"])
        if sha256 is None:
            sha256 = sha256_bytes(dumps_json(data).encode())
        return cls(
            r=r,
            num_experts=n,
            top_k=k,
            kept=dict(sorted(kept.items())),
            strategy=str(data.get("strategy", "unknown")),
            mode=str(data.get("mode", "unknown")),
            calibration=data.get("calibration"),
            model_fingerprint=data.get("model_fingerprint"),
            losses=losses,
            baselines=baselines,
            sha256=sha256,
            origin=origin,
            loss_batch_size=int(data.get("loss_batch_size") or 1),
            allocation=str(data.get("allocation", "uniform")),
        )

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        """Read ``selection.json`` (its SHA-256 is the file's)."""
        path = Path(path)
        data = read_json(path, what="selection")
        return cls.from_dict(data, origin=str(path), sha256=sha256_bytes(path.read_bytes()))

    @classmethod
    def of(cls, model: nn.Module, adapter: MoEAdapter, kept: Mapping[int, Sequence[int]], strategy: str) -> Selection:
        """MoE layer ``i`` of ``model`` keeps experts ``kept[i]``, chosen by ``strategy``."""
        data = {
            "r": len(next(iter(kept.values()), [])),
            "num_experts": adapter.num_experts(model.config),
            "top_k": adapter.top_k(model.config),
            "strategy": strategy,
            "layers": [{"layer": int(i), "kept": [int(e) for e in ids]} for i, ids in kept.items()],
        }
        return cls.from_dict(data, origin=f"{strategy} selection")

    @classmethod
    def identity(cls, model: nn.Module, adapter: MoEAdapter) -> Selection:
        """Keep every expert of every MoE layer (``r = n``): exporting it must not change the model."""
        n = adapter.num_experts(model.config)
        return cls.of(model, adapter, {i: list(range(n)) for i in adapter.moe_layer_indices(model)}, "identity")


def validate_selection(
    selection: Selection,
    *,
    moe_layers: Sequence[int],
    num_experts: int,
    top_k: int,
    fingerprint: str | None = None,
) -> None:
    """Check a selection against the model it will prune; raise one line naming what differs.

    Call before any work: a selection made for another model, another depth or another expert
    count must never produce a checkpoint.
    """
    where = selection.origin
    if fingerprint is not None and selection.model_fingerprint not in (None, fingerprint):
        raise PipelineError(
            f"{where}: made for model {selection.model_fingerprint}, but the model is {fingerprint} "
            "(rerun the search for this model)"
        )
    if selection.num_experts != num_experts:
        raise PipelineError(f"{where}: made for {selection.num_experts} experts per layer, the model has {num_experts}")
    if selection.top_k != top_k:
        raise PipelineError(f"{where}: made for top_k={selection.top_k}, the model routes to {top_k} experts")
    if selection.r < top_k:
        raise PipelineError(f"{where}: r={selection.r} is below the model's top_k={top_k} (keep at least top_k experts)")
    if selection.r > num_experts:
        raise PipelineError(f"{where}: r={selection.r} exceeds the model's {num_experts} experts")
    if sorted(selection.kept) != sorted(moe_layers):
        raise PipelineError(
            f"{where}: lists MoE layers {sorted(selection.kept)}, the model's MoE layers are {sorted(moe_layers)}"
        )
    if selection.allocation not in ("uniform", "global"):
        raise PipelineError(f"{where}: allocation {selection.allocation!r} is neither uniform nor global")
    if selection.allocation == "global" and sum(selection.counts.values()) != selection.r * len(selection.kept):
        raise PipelineError(
            f"{where}: the layers keep {sum(selection.counts.values())} experts in all, expected "
            f"r x layers = {selection.r * len(selection.kept)}"
        )
    for layer, ids in selection.kept.items():
        if selection.allocation == "uniform" and len(ids) != selection.r:
            raise PipelineError(f"{where}: layer {layer} keeps {len(ids)} experts, expected r={selection.r}")
        if not top_k <= len(ids) <= num_experts:
            raise PipelineError(f"{where}: layer {layer} keeps {len(ids)} experts, expected {top_k}..{num_experts}")
        if len(set(ids)) != len(ids) or ids[0] < 0 or ids[-1] >= num_experts:
            raise PipelineError(f"{where}: layer {layer}: kept ids {ids} must be distinct and in 0..{num_experts - 1}")


def validate_for_model(selection: Selection, model: nn.Module, adapter: MoEAdapter, fingerprint: str | None = None) -> None:
    """:func:`validate_selection` against a loaded model's structure and config."""
    validate_selection(
        selection,
        moe_layers=adapter.moe_layer_indices(model),
        num_experts=adapter.num_experts(model.config),
        top_k=adapter.top_k(model.config),
        fingerprint=fingerprint,
    )


# -- Z_hat(S) and the equivalence check ------------------------------------------------------------
@dataclass(frozen=True)
class LayerCheck:
    """Exported block vs ``Z_hat(S)`` on one layer's cached inputs."""

    layer: int
    tokens: int
    rel_error: float
    max_abs_error: float
    merge: LayerMerge | None = None


class _ErrorAccumulator:
    def __init__(self) -> None:
        self.diff_sq = 0.0
        self.ref_sq = 0.0
        self.max_abs = 0.0
        self.tokens = 0

    def add(self, got: torch.Tensor, ref: torch.Tensor) -> None:
        diff = got.double() - ref.double()
        self.diff_sq += float(diff.pow(2).sum())
        self.ref_sq += float(ref.double().pow(2).sum())
        self.max_abs = max(self.max_abs, float(diff.abs().max())) if diff.numel() else self.max_abs
        self.tokens += int(ref.shape[0])

    def result(self, layer: int) -> LayerCheck:
        rel = math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq > 0 else math.sqrt(self.diff_sq)
        return LayerCheck(layer=layer, tokens=self.tokens, rel_error=rel, max_abs_error=self.max_abs)


# -- pruning in place ------------------------------------------------------------------------------
def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def prune_model(
    model: nn.Module,
    adapter: MoEAdapter,
    selection: Selection,
    *,
    inputs: Callable[[int], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    tolerance: float | None = None,
    token_chunk: int = 8192,
    source_fingerprint: str | None = None,
    progress: bool = True,
    merge: str = "none",
    loss_batch_sequences: int = 1,
) -> list[LayerCheck]:
    """Remove the experts ``selection`` drops, in place, and record the selection in the config.

    ``inputs(layer)`` returns that MoE layer's cached block inputs (``[..., d]``); when given, the
    pruned block's forward is checked against ``Z_hat(S)`` on them (on ``device``), and a relative
    error above ``tolerance`` (default: per dtype) is a :class:`PipelineError`. On any error the
    model may be left partly pruned; discard it. Returns the per-layer checks. A model loaded with
    its layers left in the checkpoint (``pipeline.offload``) has them read one at a time and kept,
    pruned, so the whole original model is never in memory.

    ``merge`` (a :data:`pipeline.merging.METHODS` name) also plans, per layer, how the dropped experts
    fold into the kept ones (on the cached inputs, which it needs) and measures the reconstruction
    loss of the pruned and of the merged block (``loss_batch_sequences`` sequences per batch); the
    plan is each check's ``merge``, applied later by :func:`apply_merges`. The model stays pruned only.
    """
    validate_for_model(selection, model, adapter, source_fingerprint)
    _check_merge(merge, inputs)
    config = model.config
    pruned_configs = {count: adapter.pruned_config(config, count) for count in sorted(set(selection.counts.values()))}
    layers = adapter.decoder_layers(model)
    dtype = next(model.parameters()).dtype
    tol = TOLERANCE.get(dtype, 1e-2) if tolerance is None else tolerance
    checks: list[LayerCheck] = []
    source = layer_source(model)
    todo = list(range(len(layers))) if source is not None else list(selection.kept)
    for i in tqdm(todo, desc="export", unit="layer", disable=not progress, leave=False):
        if source is not None and i not in source.loaded:
            source.load(i, "cpu")  # layers stream in from the checkpoint and stay, pruned: peak = pruned model + 1 layer
        if i not in selection.kept:
            continue
        layer = layers[i]
        block = adapter.moe_block(layer)
        kept = selection.kept[i]
        pruned_config = pruned_configs[len(kept)]
        if inputs is None:
            adapter.set_moe_block(layer, adapter.prune_block(block, kept, pruned_config, i))
            continue
        home = _device_of(block)
        dev = torch.device(device) if device is not None else home
        x = inputs(i)
        new = adapter.prune_block(block.to(dev), kept, pruned_config, i)
        acc = _ErrorAccumulator()
        for chunk, got in block_outputs(adapter, new, x, token_chunk):
            acc.add(got.float(), search_output(adapter, block, config, chunk, kept))
        check = acc.result(i)
        if merge != "none":
            plan = merge_layer(
                adapter, block, new, config, x, kept, merge, i, token_chunk=token_chunk,
                batch_sequences=loss_batch_sequences,
            )
            check = replace(check, merge=plan)
            log.info(
                "layer %d: reconstruction loss pruned %.6g, merged %.6g (strength %g; full strength %.6g)",
                i, plan.loss_pruned, plan.loss_merged, plan.strength, plan.loss_by_strength.get(1.0, float("nan")),
            )
        del block
        adapter.set_moe_block(layer, new.to(home))
        checks.append(check)
        log.info("layer %d: export vs Z_hat(S): relative error %.3g, max abs %.3g", i, check.rel_error, check.max_abs_error)
        if not check.rel_error <= tol:
            raise PipelineError(
                f"layer {i}: the exported MoE block's output differs from the search's Z_hat(S) on the cached "
                f"inputs (relative error {check.rel_error:.3g} > tolerance {tol:g}); the search scored a "
                "different routing than the exported model runs"
            )
    if source is not None:
        detach_layer_source(model)  # every layer is in memory now: an ordinary model from here on
    prior_kept = getattr(model.config, KEPT_KEY, None)
    prior_pruning = getattr(model.config, PRUNING_KEY, None)
    for count, pruned_config in pruned_configs.items():  # ascending: the config ends with the largest count
        adapter.adopt_pruned_config(model, pruned_config, count)
    if selection.uniform:
        model.config.__dict__.pop(COUNTS_KEY, None)
    else:
        setattr(model.config, COUNTS_KEY, {str(i): c for i, c in selection.counts.items()})
    setattr(model.config, KEPT_KEY, compose_kept(prior_kept, selection.kept))
    chain = pruning_chain(prior_pruning, prior_kept)
    setattr(
        model.config,
        PRUNING_KEY,
        {
            **({"chain": chain} if chain else {}),
            **({} if selection.uniform else {"allocation": selection.allocation,
                                              "total_experts": sum(selection.counts.values())}),
            "strategy": selection.strategy,
            "mode": selection.mode,
            "r": selection.r,
            "num_experts_original": selection.num_experts,
            "top_k": selection.top_k,
            "calibration": selection.calibration,
            "selection_sha256": selection.sha256,
            "source_fingerprint": source_fingerprint or selection.model_fingerprint,
        },
    )
    return checks


def compose_kept(prior: Mapping[str, Sequence[int]] | None, kept: Mapping[int, Sequence[int]]) -> dict[str, list[int]]:
    """``kept_experts`` of a model pruned to ``kept``, in ids of the original model.

    ``prior`` is the ``kept_experts`` of the model being pruned when it is itself an export (its
    expert ``e`` of layer ``l`` is original expert ``prior[l][e]``); ``None`` for an original model.
    """
    if not prior:
        return {str(i): [int(e) for e in ids] for i, ids in kept.items()}
    out: dict[str, list[int]] = {}
    for i, ids in kept.items():
        before = prior.get(str(i))
        if before is None:
            raise PipelineError(f"config.json: kept_experts has no layer {i}, which the new selection prunes")
        if ids and max(ids) >= len(before):
            raise PipelineError(f"config.json: kept_experts of layer {i} lists {len(before)} experts, the selection keeps id {max(ids)}")
        out[str(i)] = [int(before[e]) for e in ids]
    return out


def pruning_chain(prior: Mapping[str, Any] | None, prior_kept: Mapping[str, Sequence[int]] | None) -> list[dict[str, Any]]:
    """The earlier prunings of a model being pruned again, oldest first (empty for an original model).

    Each step is that export's ``pruning`` record (without its own chain) plus its ``kept_experts``
    in original ids.
    """
    if not prior:
        return []
    steps = [dict(step) for step in prior.get("chain", [])]
    last = {k: v for k, v in prior.items() if k != "chain"}
    if prior_kept is not None:
        last[KEPT_KEY] = {str(k): list(v) for k, v in prior_kept.items()}
    return [*steps, last]


def _check_merge(merge: str, inputs: Callable[[int], torch.Tensor] | None) -> None:
    if merge != "none" and merge not in MERGE_METHODS:
        raise PipelineError(f"export.merge: unknown method {merge!r} (allowed: none, {', '.join(MERGE_METHODS)})")
    if merge != "none" and inputs is None:
        raise PipelineError("export.merge: merging needs the cached calibration activations (outputs/activations)")


@torch.no_grad()
def apply_merges(model: nn.Module, adapter: MoEAdapter, selection: Selection, checks: Sequence[LayerCheck]) -> dict[str, Any]:
    """Fold the dropped experts into the kept ones of the pruned ``model``, in place, as ``checks`` planned.

    Records the groups in the config (``merged_experts``) and returns that record.
    """
    layers = adapter.decoder_layers(model)
    record: dict[str, Any] = {}
    for check in checks:
        if check.merge is None:
            continue
        block = adapter.moe_block(layers[check.layer])
        apply_merge(adapter, block, selection.kept[check.layer], check.merge)
        record[str(check.layer)] = check.merge.record()
    setattr(model.config, MERGED_KEY, record)
    return record


def apply_top_k(model: nn.Module, adapter: MoEAdapter, top_k: int) -> None:
    """Lower the experts per token in ``model``'s config (static top-k reduction; takes effect when saved and loaded)."""
    config = model.config
    original = adapter.top_k(config)
    updates = adapter.top_k_updates(config, top_k)
    text = adapter.text_config(config)
    for key, value in updates.items():
        setattr(text, key, value)
    pruning = dict(getattr(config, PRUNING_KEY, None) or {})
    pruning["static_top_k"] = {"top_k": top_k, "original_top_k": original}
    setattr(config, PRUNING_KEY, pruning)


# -- sizes, model card, saving ---------------------------------------------------------------------
def parameter_stats(model: nn.Module) -> tuple[int, int]:
    """``(parameters, bytes)`` of the model's weights (tied weights counted once)."""
    count = size = 0
    for p in model.parameters():
        count += p.numel()
        size += p.numel() * p.element_size()
    return count, size


@dataclass
class ExportReport:
    """What the export did: sizes before and after, equivalence checks, files written."""

    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    checks: list[LayerCheck]
    files: list[str]
    disk_bytes: int
    merged_files: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow / ``metrics.json``."""
        out: dict[str, float] = {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "param_reduction": 1.0 - self.params_after / self.params_before,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "bytes_reduction": 1.0 - self.bytes_after / self.bytes_before,
            "checkpoint_bytes": self.disk_bytes,
        }
        if self.checks:
            out["equivalence_max_rel_error"] = max(c.rel_error for c in self.checks)
            out["equivalence_max_abs_error"] = max(c.max_abs_error for c in self.checks)
            for c in self.checks:
                out[f"equivalence_rel_error/layer_{c.layer}"] = c.rel_error
        merges = [c.merge for c in self.checks if c.merge is not None]
        if merges:
            out["reconstruction_loss/pruned"] = sum(m.loss_pruned or 0.0 for m in merges)
            out["reconstruction_loss/merged"] = sum(m.loss_merged or 0.0 for m in merges)
            out["merge_lowers_loss_layers"] = sum((m.loss_merged or 0.0) < (m.loss_pruned or 0.0) for m in merges)
            out["reconstruction_loss/merged_full_strength"] = sum(m.loss_by_strength.get(1.0, 0.0) for m in merges)
            for m in merges:
                out[f"reconstruction_loss/layer_{m.layer}/pruned"] = m.loss_pruned or 0.0
                out[f"reconstruction_loss/layer_{m.layer}/merged"] = m.loss_merged or 0.0
                out[f"reconstruction_loss/layer_{m.layer}/merged_full_strength"] = m.loss_by_strength.get(1.0, 0.0)
                out[f"merge_strength/layer_{m.layer}"] = m.strength
        return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def model_card(
    selection: Selection,
    *,
    source: str,
    params_before: int,
    params_after: int,
    bytes_before: int,
    bytes_after: int,
    checks: Sequence[LayerCheck] = (),
    model_type: str = "",
    source_fingerprint: str | None = None,
    top_k: int | None = None,
    merged: bool = False,
    kept_original: Mapping[str, Sequence[int]] | None = None,
    chain: Sequence[Mapping[str, Any]] = (),
) -> str:
    """README.md of the exported checkpoint: what was removed, the losses, how it was made and loaded.

    ``top_k``: the lowered experts per token (static top-k reduction), if any; ``merged``: the card of
    the merged checkpoint, with a table of what was merged into what (from each check's ``merge``).
    ``kept_original``: the kept ids in the original model's numbering (the config's ``kept_experts``)
    when the source was itself pruned, whose earlier prunings ``chain`` lists (:func:`pruning_chain`).
    """
    n, r = selection.num_experts, selection.r
    n_original = int(chain[0].get("num_experts_original", n)) if chain else n
    baseline_names = sorted({name for b in selection.baselines.values() for name in b})
    check_by_layer = {c.layer: c for c in checks}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [mixture-of-experts, expert-pruning]",
        "---",
        "",
        f"# {Path(source).name or source}: "
        + (f"{r} of {n} experts per MoE layer" if selection.uniform
           else f"{sum(selection.counts.values())} experts in {len(selection.kept)} MoE layers ({r} of {n} on average)")
        + (", merged" if merged else ""),
        "",
        f"Expert-pruned version of `{source}`{f' ({model_type})' if model_type else ''}: "
        + (f"every MoE layer keeps {r} of its {n} routed experts (" if selection.uniform else
           f"the MoE layers keep {', '.join(str(c) for c in selection.counts.values())} of their {n} routed experts "
           "(one global budget split across layers by the search, `search.allocation: global`; ")
        + (f"top-{top_k} routing instead of the original top-{selection.top_k}: static top-k reduction"
           if top_k is not None else f"top-{selection.top_k} routing unchanged")
        + "), chosen to minimise the reconstruction loss of the layer's output on calibration data (Lu et al., "
        "2024, *Not All Experts are Equal*)."
        + (" Each dropped expert is merged into a kept expert (weights averaged by routing mass after neuron "
           "alignment; table below)." if merged else ""),
        "",
        "## How it was made",
        "",
        f"- strategy: `{selection.strategy}`, mode: `{selection.mode}`, calibration set: `{selection.calibration}`",
        f"- source model fingerprint: `{source_fingerprint or selection.model_fingerprint}`",
        f"- selection SHA-256: `{selection.sha256}`",
        "- the router keeps only the rows of the kept experts (ascending original id); shared experts are unchanged",
        "",
        *_chain_lines(selection, chain),
        "## Size",
        "",
        "| | parameters | weight bytes |",
        "|---|---:|---:|",
        f"| original | {params_before:,} | {_fmt_bytes(bytes_before)} |",
        f"| pruned | {params_after:,} | {_fmt_bytes(bytes_after)} |",
        "",
        "## Kept experts per layer",
        "",
        "Original expert ids"
        + (f" (of the first model's {n_original}, through the chain of prunings above)" if chain else "")
        + "; `config.json` holds the same map under `kept_experts`.",
        "",
    ]
    header = "| layer | kept | dropped | loss |" + "".join(f" {b} loss |" for b in baseline_names)
    if checks:
        header += " export vs search (rel. error) |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for layer, ids in selection.kept.items():
        if kept_original is not None:
            ids = list(kept_original[str(layer)])
        dropped = sorted(set(range(n_original)) - set(ids))
        loss = selection.losses.get(layer)
        row = f"| {layer} | {ids} | {dropped} | {'' if loss is None else f'{loss:.6g}'} |"
        for b in baseline_names:
            value = selection.baselines.get(layer, {}).get(b, {})
            value = value.get("loss") if isinstance(value, Mapping) else None
            row += f" {'' if not isinstance(value, int | float) else f'{value:.6g}'} |"
        if checks:
            c = check_by_layer.get(layer)
            row += f" {'' if c is None else f'{c.rel_error:.2e}'} |"
        lines.append(row)
    merges = [c.merge for c in checks if c.merge is not None] if merged else []
    if merges:
        lines += [
            "",
            f"## Merged experts (method `{merges[0].method}`)",
            "",
            "Each dropped expert was folded into one kept expert: the kept expert's weights are the average of its "
            "group's neuron-aligned weights, weighted by routing mass on the calibration tokens times the layer's "
            "merge strength (the weights below; kept experts not listed are unchanged). `config.json` holds the "
            "same map under `merged_experts`.",
            "",
            "| layer | kept expert | merged from (original id: weight) |",
            "|---|---|---|",
        ]
        for m in merges:
            for k, group in m.groups.items():
                if len(group) > 1:
                    lines.append(f"| {m.layer} | {k} | {', '.join(f'{e}: {w:.3f}' for e, w in group.items())} |")
        lines += [
            "",
            "Reconstruction loss per layer on the calibration tokens (sum over batches of `||Z_b - Z_hat_b||_F`, "
            "the search's loss):",
            "",
            "| layer | merge strength | pruned | pruned + merged | merged at full strength |",
            "|---|---:|---:|---:|---:|",
            *(f"| {m.layer} | {m.strength:g} | {m.loss_pruned or 0:.6g} | {m.loss_merged or 0:.6g} | "
              f"{m.loss_by_strength.get(1.0, float('nan')):.6g} |" for m in merges),
        ]
    loading = (
        [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "model = AutoModelForCausalLM.from_pretrained(PATH)  # no trust_remote_code needed",
            "tokenizer = AutoTokenizer.from_pretrained(PATH)",
            "```",
        ]
        if selection.uniform
        else [
            "The MoE layers hold different numbers of experts (`experts_per_layer` in `config.json`; the config's "
            "expert count is the largest). Plain `AutoModelForCausalLM.from_pretrained`, vLLM and llama.cpp build every "
            "layer with one count and refuse these weights; load it with this project's call, which builds the model "
            "from transformers' own classes with each layer at its count:",
            "",
            "```python",
            "from pipeline.models.loading import load_model",
            "from transformers import AutoTokenizer",
            "model = load_model(PATH)",
            "tokenizer = AutoTokenizer.from_pretrained(PATH)",
            "```",
        ]
    )
    lines += [
        "",
        "## Loading",
        "",
        *loading,
        "",
        "Dynamic expert skipping (when `config.json` has `expert_skip_thresholds`):",
        "",
        "```python",
        "from pipeline import skipping",
        "with skipping.enable(model) as handle:",
        "    model.generate(...)",
        "print(handle.stats())",
        "```",
        "",
    ]
    return "\n".join(lines)


def _chain_lines(selection: Selection, chain: Sequence[Mapping[str, Any]]) -> list[str]:
    """The card's "Chain of prunings" section (nothing for a first pruning)."""
    if not chain:
        return []
    lines = [
        "## Chain of prunings",
        "",
        "The source was itself pruned by this tool; each step pruned the previous step's checkpoint.",
        "",
        "| step | strategy | experts per layer | selection SHA-256 |",
        "|---:|---|---|---|",
    ]
    steps = [*chain, {"strategy": selection.strategy, "r": selection.r, "num_experts_original": selection.num_experts,
                      "selection_sha256": selection.sha256}]
    for number, step in enumerate(steps, 1):
        lines.append(
            f"| {number} | `{step.get('strategy')}` | {step.get('r')} of {step.get('num_experts_original')} | "
            f"`{step.get('selection_sha256')}` |"
        )
    return [*lines, ""]


def checkpoint_files_bytes(path: Path) -> int:
    """Bytes of the safetensors files in a checkpoint directory."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def save_checkpoint(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    max_shard_size: str | int = "5GB",
    card: str | None = None,
) -> list[str]:
    """Save model (safetensors, sharded), tokenizer and model card; ``out_dir`` is replaced atomically."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        try:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        except ValueError as exc:
            raise PipelineError(f"cannot save the checkpoint to {out_dir}: {exc}") from None
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        files = sorted(p.name for p in tmp.iterdir())
    return files


def export_pruned(
    model: nn.Module,
    adapter: MoEAdapter,
    selection: Selection,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    source: str = "",
    source_fingerprint: str | None = None,
    max_shard_size: str | int = "5GB",
    inputs: Callable[[int], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    tolerance: float | None = None,
    progress: bool = True,
    merge: str = "none",
    merged_dir: str | Path | None = None,
    top_k: int | None = None,
    loss_batch_sequences: int = 1,
) -> ExportReport:
    """Validate ``selection``, prune ``model`` in place, check it on ``inputs``, save it to ``out_dir``.

    ``out_dir`` is written atomically (a directory already there, complete or half-written by a
    crash, is replaced as a whole; on error it is left untouched). With ``merge`` (a
    :data:`pipeline.merging.METHODS` name; needs ``inputs``) the merged model is then saved to
    ``merged_dir`` the same way. ``top_k`` lowers the experts per token of both checkpoints.
    """
    validate_for_model(selection, model, adapter, source_fingerprint)
    _check_merge(merge, inputs)
    if merge != "none" and merged_dir is None:
        raise PipelineError("export.merge: no directory given for the merged checkpoint")
    if top_k is not None:
        adapter.top_k_updates(model.config, top_k)  # a bad top_k stops here, before any work
    params_before, bytes_before = parameter_stats(model)
    checks = prune_model(
        model,
        adapter,
        selection,
        inputs=inputs,
        device=device,
        tolerance=tolerance,
        source_fingerprint=source_fingerprint,
        progress=progress,
        merge=merge,
        loss_batch_sequences=loss_batch_sequences,
    )
    if top_k is not None:
        apply_top_k(model, adapter, top_k)
    params_after, bytes_after = parameter_stats(model)
    chain = (getattr(model.config, PRUNING_KEY, None) or {}).get("chain", [])
    card_args: dict[str, Any] = dict(
        kept_original=getattr(model.config, KEPT_KEY) if chain else None,
        chain=chain,
        source=source or str(getattr(model.config, "_name_or_path", "") or "model"),
        params_before=params_before,
        params_after=params_after,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        checks=checks,
        model_type=str(getattr(model.config, "model_type", "")),
        source_fingerprint=source_fingerprint,
        top_k=top_k,
    )
    card = model_card(selection, **card_args)
    files = save_checkpoint(model, out_dir, tokenizer=tokenizer, max_shard_size=max_shard_size, card=card)
    merged_files: list[str] = []
    if merge != "none" and merged_dir is not None:
        apply_merges(model, adapter, selection, checks)
        merges = [c.merge for c in checks if c.merge is not None]
        setattr(
            model.config,
            MERGING_KEY,
            {
                "method": merge,
                "weights": "routing mass on the calibration tokens, normalised per kept expert, times the merge strength",
                "strength": {str(m.layer): m.strength for m in merges},
                "neuron_alignment": "linear assignment on the neurons' weights",
                "loss_pruned": sum(m.loss_pruned or 0.0 for m in merges),
                "loss_merged": sum(m.loss_merged or 0.0 for m in merges),
                "loss_batch_sequences": loss_batch_sequences,
            },
        )
        merged_card = model_card(selection, merged=True, **card_args)
        merged_files = save_checkpoint(
            model, merged_dir, tokenizer=tokenizer, max_shard_size=max_shard_size, card=merged_card
        )
    return ExportReport(
        params_before=params_before,
        params_after=params_after,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        checks=checks,
        files=files,
        disk_bytes=checkpoint_files_bytes(Path(out_dir)),
        merged_files=merged_files,
    )


__all__ = [
    "KEPT_KEY",
    "MERGED_KEY",
    "MERGING_KEY",
    "PRUNING_KEY",
    "apply_merges",
    "apply_top_k",
    "compose_kept",
    "ExportReport",
    "LayerCheck",
    "Selection",
    "export_pruned",
    "model_card",
    "parameter_stats",
    "prune_model",
    "pruning_chain",
    "save_checkpoint",
    "validate_for_model",
    "validate_selection",
]
