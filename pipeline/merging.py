"""Merging dropped experts into kept ones (method.md section 9; HC-SMoE / MC-SMoE style).

For one MoE layer and a kept set ``S``, each dropped expert is assigned to the kept expert it is
most similar to on the calibration tokens: by the cosine of their mean outputs (``output``, HC-SMoE)
or of their router-logit columns (``router``, MC-SMoE). A kept expert ``k`` and the experts assigned
to it form a group ``G_k``; its merged weights are the routing-mass-weighted average

    W_k' = sum_{e in G_k} a_e P_e(W_e),   a_e = m_e / sum_{g in G_k} m_g,

where ``m_e`` is expert ``e``'s routing mass (the sum of its routing weights over the calibration
tokens in the original model) and ``P_e`` permutes ``e``'s intermediate neurons to match ``k``'s
(the assignment maximising the summed dot products of the neurons' weights). The router keeps
``k``'s row, so the merged checkpoint has the pruned model's layout. Where the group is ``{k}`` the
expert is unchanged; a group whose experts are identical to ``k`` merges to ``k`` exactly.

The merge strength ``s`` scales the dropped experts' share (``a_k -> 1 - s (1 - a_k)``,
``a_j -> s a_j``; still non-negative and summing to one): per layer, the strength of
:data:`STRENGTHS` with the lowest reconstruction loss ``sum_b ||Z_b - Z_hat_b||_F`` on the
calibration tokens (the search's own loss) is kept, so a merge never raises that loss above pruning
(``s = 0`` is pruning). The full-strength loss is reported next to it.

Everything here works through the adapter (expert outputs, routing, fused expert tensors and their
neuron layout), never on model names.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models.base import MoEAdapter

#: ``export.merge`` values that merge (``none`` does not).
METHODS = ("output", "router")
#: Merge strengths tried per layer (0: the pruned expert unchanged; 1: the routing-mass average).
STRENGTHS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class LayerMerge:
    """What one MoE layer's merge did: groups and their weights, and the reconstruction losses.

    ``groups[k]`` maps original expert ids to their merge weights for kept expert ``k`` (itself
    included; weights are non-negative and sum to one); ``assignment[j]`` is the kept expert a
    dropped expert ``j`` went to, with ``similarity[j]`` its score; ``mass`` is every original
    expert's routing mass. ``loss_pruned`` / ``loss_merged``: ``sum_b ||Z_b - Z_hat_b||_F`` of the
    pruned and of the merged block on the calibration tokens (None when not measured); ``strength``
    the merge strength the groups' weights carry, ``loss_by_strength`` the loss at each one tried.
    """

    layer: int
    method: str
    groups: dict[int, dict[int, float]]
    assignment: dict[int, int]
    similarity: dict[int, float]
    mass: dict[int, float]
    loss_pruned: float | None = None
    loss_merged: float | None = None
    strength: float = 1.0
    loss_by_strength: dict[float, float] = field(default_factory=dict)
    tensors: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def record(self) -> dict[str, Any]:
        """The JSON form written to the merged checkpoint's config (``merged_experts``)."""
        return {
            str(k): {str(e): round(w, 6) for e, w in group.items()}
            for k, group in self.groups.items()
            if len(group) > 1
        }


# -- statistics on the calibration tokens ----------------------------------------------------------
def _token_batches(x: torch.Tensor, token_chunk: int) -> Iterator[torch.Tensor]:
    flat = x.reshape(-1, x.shape[-1])
    for s in range(0, flat.shape[0], token_chunk):
        yield flat[s : s + token_chunk]


def _on_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    param = next(block.parameters())
    return x.to(param.device, param.dtype)


@torch.no_grad()
def routing_mass(
    adapter: MoEAdapter, block: nn.Module, config: Any, x: torch.Tensor, token_chunk: int = 8192
) -> torch.Tensor:
    """Each expert's routing mass in the unpruned ``block``: the sum of its routing weights over the tokens ``[n]``."""
    n = adapter.block_num_experts(block)
    mass = torch.zeros(n, dtype=torch.float64)
    for xb in _token_batches(x, token_chunk):
        xb = _on_block(block, xb)
        weights, ids = adapter.route(block, adapter.router_logits(block, xb), config, None)
        mass.index_add_(0, ids.reshape(-1).cpu(), weights.reshape(-1).double().cpu())
    return mass


@torch.no_grad()
def expert_similarity(
    adapter: MoEAdapter, block: nn.Module, x: torch.Tensor, method: str, token_chunk: int = 8192
) -> torch.Tensor:
    """Pairwise similarity ``[n, n]`` of the block's experts on the tokens ``x``.

    ``output``: cosine of the experts' mean outputs (every expert run on every token).
    ``router``: cosine of the router-logit columns, each token's logits centred (softmax ignores a shift).
    """
    if method not in METHODS:
        raise PipelineError(f"export.merge: unknown method {method!r} (allowed: none, {', '.join(METHODS)})")
    n = adapter.block_num_experts(block)
    if method == "output":
        total: torch.Tensor | None = None
        count = 0
        for xb in _token_batches(x, token_chunk):
            y = adapter.expert_outputs(block, _on_block(block, xb)).double().sum(0).cpu()  # [n, d]
            total = y if total is None else total + y
            count += xb.shape[0]
        feats = (total if total is not None else torch.zeros(n, 1, dtype=torch.float64)) / max(count, 1)
    else:
        gram = torch.zeros(n, n, dtype=torch.float64)
        for xb in _token_batches(x, token_chunk):
            logits = adapter.router_logits(block, _on_block(block, xb)).double().cpu()
            logits = logits - logits.mean(-1, keepdim=True)
            gram += logits.T @ logits
        norms = gram.diagonal().clamp_min(1e-300).sqrt()
        return gram / norms[:, None] / norms[None, :]
    norms = feats.norm(dim=-1).clamp_min(1e-300)
    return (feats @ feats.T) / norms[:, None] / norms[None, :]


def assign_dropped(similarity: torch.Tensor, kept: Sequence[int]) -> dict[int, int]:
    """Each dropped expert's most similar kept expert (ties: the lowest id)."""
    kept = sorted(int(k) for k in kept)
    n = similarity.shape[0]
    kept_t = torch.tensor(kept, dtype=torch.long)
    out: dict[int, int] = {}
    for j in range(n):
        if j in kept:
            continue
        scores = similarity[j].index_select(0, kept_t)
        out[j] = kept[int(torch.argmax(scores))]
    return out


def scaled_groups(groups: Mapping[int, Mapping[int, float]], strength: float) -> dict[int, dict[int, float]]:
    """Groups at merge ``strength``: the dropped experts' weights times ``strength``, the kept expert's the rest."""
    return {
        k: {e: (1.0 - strength * (1.0 - w) if e == k else strength * w) for e, w in group.items()}
        for k, group in groups.items()
    }


def merge_weights(mass: torch.Tensor, assignment: Mapping[int, int], kept: Sequence[int]) -> dict[int, dict[int, float]]:
    """Per kept expert, its group's merge weights: routing mass normalised over the group.

    Non-negative and summing to one; a group without routing mass keeps its kept expert unchanged.
    """
    groups: dict[int, dict[int, float]] = {}
    for k in sorted(int(k) for k in kept):
        members = [k] + sorted(j for j, target in assignment.items() if target == k)
        masses = [max(float(mass[e]), 0.0) for e in members]
        total = sum(masses)
        groups[k] = {e: (m / total if total > 0 else float(e == k)) for e, m in zip(members, masses, strict=True)}
    return groups


# -- neuron alignment ------------------------------------------------------------------------------
def _to_neurons(t: torch.Tensor, layout: tuple[int, int, bool]) -> torch.Tensor:
    """One expert's tensor as ``[f, groups, rest]`` (neuron first)."""
    axis, groups, interleaved = layout
    moved = t.movedim(axis, 0)
    rest = moved.shape[1:]
    f = moved.shape[0] // groups
    if interleaved:
        return moved.reshape(f, groups, *rest)
    return moved.reshape(groups, f, *rest).transpose(0, 1)


def _from_neurons(u: torch.Tensor, layout: tuple[int, int, bool]) -> torch.Tensor:
    axis, groups, interleaved = layout
    f, rest = u.shape[0], u.shape[2:]
    moved = u.reshape(f * groups, *rest) if interleaved else u.transpose(0, 1).reshape(groups * f, *rest)
    return moved.movedim(0, axis)


def _layout(adapter: MoEAdapter, tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int, bool]]:
    return {name: adapter.neuron_layout[name] for name in tensors if name in adapter.neuron_layout}


def permute_neurons(
    adapter: MoEAdapter, expert: Mapping[str, torch.Tensor], perm: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One expert's tensors (no expert dim) with its intermediate neurons reordered: neuron ``i`` <- ``perm[i]``."""
    layout = _layout(adapter, expert)
    out = {}
    for name, t in expert.items():
        if name in layout:
            out[name] = _from_neurons(_to_neurons(t, layout[name]).index_select(0, perm.to(t.device)), layout[name])
        else:
            out[name] = t
    return out


def neuron_features(adapter: MoEAdapter, expert: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every intermediate neuron's weights (rows of gate/up, columns of down, biases) as ``[f, features]``."""
    layout = _layout(adapter, expert)
    if not layout:
        raise PipelineError(
            f"export.merge: the {adapter.family} adapter declares no neuron layout for its experts' tensors "
            f"({', '.join(expert)}); neurons cannot be aligned"
        )
    feats = [_to_neurons(expert[name], lay).reshape(_to_neurons(expert[name], lay).shape[0], -1) for name, lay in layout.items()]
    sizes = {f.shape[0] for f in feats}
    if len(sizes) != 1:
        raise PipelineError(f"export.merge: {adapter.family} expert tensors disagree on the number of neurons ({sizes})")
    return torch.cat(feats, dim=1).double()


def align_neurons(adapter: MoEAdapter, target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The permutation of ``source``'s neurons that best matches ``target``'s (maximum summed dot product)."""
    from scipy.optimize import linear_sum_assignment

    a, b = neuron_features(adapter, target).cpu(), neuron_features(adapter, source).cpu()
    _rows, cols = linear_sum_assignment((a @ b.T).numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def merged_expert(
    adapter: MoEAdapter, tensors: Mapping[str, torch.Tensor], kept: int, group: Mapping[int, float]
) -> dict[str, torch.Tensor]:
    """Kept expert ``kept``'s merged tensors from the fused ``tensors`` of the unpruned block.

    Computed as ``W_k + sum_j a_j (P_j(W_j) - W_k)`` (equal to ``sum_e a_e P_e(W_e)`` as the weights
    sum to one), so members identical to ``W_k`` leave it bit-identical.
    """
    base = {name: t[kept] for name, t in tensors.items()}
    out = {name: t.double().clone() for name, t in base.items()}
    for e, weight in group.items():
        if e == kept or weight == 0.0:
            continue
        member = {name: t[e] for name, t in tensors.items()}
        aligned = permute_neurons(adapter, member, align_neurons(adapter, base, member))
        for name in out:
            out[name] += weight * (aligned[name].double() - base[name].double())
    return {name: out[name].to(base[name].dtype) for name in out}


# -- one layer -------------------------------------------------------------------------------------
@torch.no_grad()
def plan_layer(
    adapter: MoEAdapter,
    block: nn.Module,
    config: Any,
    x: torch.Tensor,
    kept: Sequence[int],
    method: str,
    layer: int,
    token_chunk: int = 8192,
) -> LayerMerge:
    """Assign the experts ``block`` drops to its ``kept`` ones and compute the merged kept experts.

    ``block`` is the unpruned block, ``x`` its cached inputs. The merged tensors of every kept
    expert that receives a dropped one are in ``tensors`` (by original id, on the CPU).
    """
    kept = sorted(int(k) for k in kept)
    tensors = adapter.expert_tensors(block)
    if not tensors:
        raise PipelineError(
            f"export.merge: layer {layer}: the {adapter.family} experts are not stored as fused tensors; merging needs them"
        )
    mass = routing_mass(adapter, block, config, x, token_chunk)
    similarity = expert_similarity(adapter, block, x, method, token_chunk)
    assignment = assign_dropped(similarity, kept)
    groups = merge_weights(mass, assignment, kept)
    merged = _merged_tensors(adapter, tensors, groups)
    return LayerMerge(
        layer=layer,
        method=method,
        groups=groups,
        assignment=assignment,
        similarity={j: float(similarity[j, k]) for j, k in assignment.items()},
        mass={e: float(m) for e, m in enumerate(mass.tolist())},
        tensors=merged,
    )


def _merged_tensors(
    adapter: MoEAdapter, tensors: Mapping[str, torch.Tensor], groups: Mapping[int, Mapping[int, float]]
) -> dict[int, dict[str, torch.Tensor]]:
    return {
        k: {name: t.cpu() for name, t in merged_expert(adapter, tensors, k, group).items()}
        for k, group in groups.items()
        if len(group) > 1
    }


@torch.no_grad()
def merge_layer(
    adapter: MoEAdapter,
    block: nn.Module,
    pruned: nn.Module,
    config: Any,
    x: torch.Tensor,
    kept: Sequence[int],
    method: str,
    layer: int,
    *,
    token_chunk: int = 8192,
    batch_sequences: int = 1,
    strengths: Sequence[float] = STRENGTHS,
) -> LayerMerge:
    """:func:`plan_layer`, then the merge strength with the lowest reconstruction loss (ties: the weakest).

    ``pruned`` is ``block`` with only ``kept`` (unchanged here); the losses are measured on ``x``
    with ``batch_sequences`` sequences per batch against ``block``'s own output.
    """
    plan = plan_layer(adapter, block, config, x, kept, method, layer, token_chunk)
    reference = reference_outputs(adapter, block, x, token_chunk)  # Z once, for every strength
    (loss_pruned,) = reconstruction_losses(adapter, block, [pruned], x, batch_sequences, reference, token_chunk)
    if not plan.tensors:  # nothing assigned anywhere (r = n)
        return replace(plan, loss_pruned=loss_pruned, loss_merged=loss_pruned, strength=0.0)
    tensors = adapter.expert_tensors(block)
    candidate = copy.deepcopy(pruned)
    best: tuple[float, float, dict[int, dict[int, float]], dict[int, dict[str, torch.Tensor]]] | None = None
    losses: dict[float, float] = {}
    for strength in sorted(strengths):
        groups = scaled_groups(plan.groups, strength)
        merged = _merged_tensors(adapter, tensors, groups)
        apply_merge(adapter, candidate, kept, replace(plan, tensors=merged))
        (loss,) = reconstruction_losses(adapter, block, [candidate], x, batch_sequences, reference, token_chunk)
        losses[float(strength)] = loss
        if best is None or loss < best[0]:
            best = (loss, float(strength), groups, merged)
    del candidate
    assert best is not None
    loss, strength, groups, merged = best
    return replace(
        plan, groups=groups, tensors=merged, strength=strength, loss_pruned=loss_pruned, loss_merged=loss,
        loss_by_strength=losses,
    )


@torch.no_grad()
def apply_merge(adapter: MoEAdapter, pruned: nn.Module, kept: Sequence[int], merge: LayerMerge) -> None:
    """Write ``merge``'s merged experts into the pruned block (experts at positions of ascending ``kept``), in place."""
    position = {int(k): p for p, k in enumerate(sorted(int(k) for k in kept))}
    tensors = adapter.expert_tensors(pruned)
    for k, merged in merge.tensors.items():
        for name, value in merged.items():
            tensors[name][position[k]].copy_(value.to(tensors[name].device, tensors[name].dtype))


def _outputs(adapter: MoEAdapter, block: nn.Module, x: torch.Tensor, token_chunk: int) -> torch.Tensor:
    """``block``'s own output on every token of ``x`` (a token-wise block: computed ``token_chunk`` tokens at a
    time), float64 on the CPU, shaped like ``x``."""
    out = [adapter.block_output(block, _on_block(block, xb)).double().cpu() for xb in _token_batches(x, token_chunk)]
    return torch.cat(out).reshape(x.shape)


def _batch_norms(diff: torch.Tensor, batch_sequences: int) -> float:
    """``sum_b ||diff_b||_F`` with ``b`` = ``batch_sequences`` consecutive sequences (a 2-D ``diff`` is one batch)."""
    if diff.dim() == 2:
        return float(torch.linalg.matrix_norm(diff))
    return sum(
        float(diff[s : s + batch_sequences].reshape(-1, diff.shape[-1]).norm())
        for s in range(0, diff.shape[0], batch_sequences)
    )


@torch.no_grad()
def reference_outputs(adapter: MoEAdapter, reference: nn.Module, x: torch.Tensor, token_chunk: int = 8192) -> torch.Tensor:
    """``Z``: ``reference``'s own output on every token of ``x`` (float64, CPU, shaped like ``x``)."""
    return _outputs(adapter, reference, x, token_chunk)


@torch.no_grad()
def reconstruction_losses(
    adapter: MoEAdapter,
    reference: nn.Module,
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    batch_sequences: int = 1,
    outputs: torch.Tensor | None = None,
    token_chunk: int = 8192,
) -> list[float]:
    """``sum_b ||Z_b - Z_hat_b||_F`` of each block in ``blocks`` against ``reference`` (float64 sums).

    ``x`` is ``[N, L, d]``; a batch ``b`` is ``batch_sequences`` consecutive sequences (method.md
    section 2, the search's loss); a 2-D ``x`` is one batch. ``outputs``: the reference's
    :func:`reference_outputs`, when already computed.
    """
    z = reference_outputs(adapter, reference, x, token_chunk) if outputs is None else outputs
    return [_batch_norms(z - _outputs(adapter, block, x, token_chunk), batch_sequences) for block in blocks]


__all__ = [
    "METHODS",
    "STRENGTHS",
    "LayerMerge",
    "align_neurons",
    "apply_merge",
    "assign_dropped",
    "expert_similarity",
    "merge_layer",
    "merge_weights",
    "merged_expert",
    "neuron_features",
    "permute_neurons",
    "plan_layer",
    "reconstruction_losses",
    "reference_outputs",
    "routing_mass",
    "scaled_groups",
]
