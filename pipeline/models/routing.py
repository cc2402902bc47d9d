"""Routing rules: router logits over a set of experts -> top-k weights and local expert indices.

Each rule reproduces one family's router exactly (verified against the model's own router in the
tests). A candidate kept set ``S`` is scored by applying the rule of the *pruned* config to the
logits of ``S`` only, which is what the exported router (its rows sliced to ``S``) computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class RoutingRule(Protocol):
    """Maps router logits ``[T, m]`` (and per-expert bias ``[m]``) to weights and indices ``[T, k]``."""

    top_k: int

    def __call__(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(weights, indices)``; indices are positions in the given ``m`` experts."""
        ...


def is_local(rule: object) -> bool:
    """Whether ``rule`` routes each token from per-expert scores alone (``local`` on the rule, default False).

    A local rule picks a token's top-k by a score of each expert that does not depend on which other
    experts are present, and weighs them from the chosen experts' logits only. So on any set ``S'``
    with ``chosen(S) <= S' <= S`` it routes as on ``S``, and ``chosen(S - {e})`` lies in the top
    ``k + 1`` of ``S`` (the rule with ``top_k + 1``). Incremental search (docs/search.md) relies on
    this (and, for a family with a selection bias, on ``row_bias``: the rule takes a bias row per
    token); other rules are scored in full.
    """
    return bool(getattr(rule, "local", False))


def routes_children(rule: object) -> bool:
    """Whether ``rule`` routes every drop-one child of a set at once (``drop_one``; see :class:`SigmoidBiasTopK`)."""
    return bool(getattr(rule, "routes_children", False))


@dataclass(frozen=True)
class ChildRoutes:
    """Routings of many sets on many tokens, each distinct one stored once.

    Row ``r`` routes token ``tok[r]`` to ``positions[r]`` with ``weights[r]`` ``[k]``; set ``i``
    on token ``t`` uses row ``use[t, i]``.
    """

    tok: torch.Tensor
    weights: torch.Tensor
    positions: torch.Tensor
    use: torch.Tensor


@dataclass(frozen=True)
class SoftmaxTopK:
    """``p = softmax(logits)``, top-k of ``p``, optionally renormalised, times ``scale``.

    Mixtral (renormalised), Qwen1.5/Qwen2/Qwen3-MoE and OLMoE (``norm_topk_prob``), DeepSeek-V2
    ``greedy`` (not renormalised, scaled by ``routed_scaling_factor``).
    """

    top_k: int
    renormalize: bool
    scale: float = 1.0
    cast_to_logits_dtype: bool = False

    @property
    def local(self) -> bool:
        """Renormalised weights depend on the chosen logits only; without it on every kept logit."""
        return self.renormalize

    def __call__(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(logits.float(), dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.scale != 1.0:
            weights = weights * self.scale
        if self.cast_to_logits_dtype:
            weights = weights.to(logits.dtype)
        return weights, idx


@dataclass(frozen=True)
class GroupLimitedSoftmax:
    """DeepSeek-V2 ``group_limited_greedy``: softmax, keep the ``topk_group`` groups with the best
    maximum, top-k inside them, times ``scale``."""

    top_k: int
    n_group: int
    topk_group: int
    scale: float = 1.0

    def __call__(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.softmax(logits.float(), dim=-1)
        t, m = scores.shape
        group_scores = scores.view(t, self.n_group, m // self.n_group).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        mask = mask.unsqueeze(-1).expand(t, self.n_group, m // self.n_group).reshape(t, m)
        scores = scores.masked_fill(~mask.bool(), 0.0)
        weights, idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return weights * self.scale, idx


@dataclass(frozen=True)
class SigmoidBiasTopK:
    """DeepSeek-V3 / GLM-4-MoE style: ``s = sigmoid(logits)``; experts chosen by ``s + bias`` inside
    the ``topk_group`` best groups (group score = sum of its two best); weights are ``s`` of the
    chosen experts, optionally renormalised, times ``scale``."""

    row_bias = True  # the bias may also be one row per token, [T, m]
    top_k: int
    n_group: int
    topk_group: int
    renormalize: bool
    scale: float = 1.0
    eps: float = 1e-20  # added to the renormalisation denominator (LFM2-MoE: 1e-6, MiniMax-M2: 0)
    softcap: float = 0.0  # logits -> softcap * tanh(logits / softcap) first, when > 0 (Laguna)
    masked_value: float = float("-inf")  # choice score of experts outside the chosen groups (A.X K2: 0)

    @property
    def local(self) -> bool:
        """Without groups the choice is per expert; group scores depend on the other experts."""
        return self.n_group == 1

    @property
    def routes_children(self) -> bool:
        """Group-limited with masked experts never chosen: :meth:`drop_one` applies."""
        return self.n_group > 1 and self.masked_value == float("-inf")

    def _scores(self, logits: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()
        if self.softcap > 0.0:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        scores = torch.sigmoid(logits)
        return scores, (scores if bias is None else scores + bias.float())

    def drop_one(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> ChildRoutes:
        """This rule on every set that drops one of ``M = n_group * g + 1`` experts at once.

        ``logits [T, M]`` (bias ``[M]``) -> the distinct routings (positions among the ``M``) and
        which one child ``i`` uses on each token, as ``self(logits without column i)`` routes it.
        Dropping ``i`` (group ``J = i // g``) leaves the child's groups before ``J`` at positions
        ``[jg, jg + g)``, those after at ``[jg + 1, jg + g + 1)`` and group ``J`` the window
        ``[Jg, Jg + g]`` without ``i``. Group ``J``'s score then takes one of three values (``i``
        is the window's best, its second, or neither), so per token and ``J`` three routings,
        each a top ``k + 1`` of the chosen groups' best ``k + 1``, give every child: the first
        two drop their expert; the third routes child ``i`` to its top ``k`` without ``i``.
        """
        scores, choice = self._scores(logits, bias)
        t, big_m = choice.shape
        groups, per, k = self.n_group, (big_m - 1) // self.n_group, self.top_k
        if not self.routes_children or groups * per + 1 != big_m or per < 2:
            raise ValueError(f"drop_one needs n_group > 1, -inf masking and n_group * g + 1 experts (got {big_m})")
        dev, width = choice.device, min(k + 1, per + 1)
        low = choice[:, : groups * per].view(t, groups, per)  # the child's groups before J
        high = choice[:, 1:].view(t, groups, per)  # after J
        window = choice.unfold(1, per + 1, per)  # [t, groups, per + 1]: group J's window
        j, big_j = torch.arange(groups, device=dev), torch.arange(groups + 1, device=dev).view(-1, 1)
        j_all = big_j.view(-1)

        def best(part: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Each group's best ``width`` (padded with -inf) as choice values and positions, best first."""
            v, at = part.topk(min(width, part.shape[2]), dim=-1)
            at = at + (j * per + shift).view(1, groups, 1)
            fill = width - v.shape[2]
            return (torch.cat([v, v.new_full((t, groups, fill), float("-inf"))], 2),
                    torch.cat([at, at.new_zeros(t, groups, fill)], 2))

        (v_low, p_low), (v_high, p_high), (v_win, p_win) = best(low, 0), best(high, 1), best(window, 0)
        # Group J's score as the rule computes it (the sum of the best two left), per case.
        w3 = v_win[..., :3]
        mid = torch.stack([w3[..., 0] + w3[..., 1], w3[..., 1] + w3[..., 2], w3[..., 0] + w3[..., 2]], 2)
        mid = torch.cat([mid, mid.new_zeros(t, 1, 3)], 1)  # J = groups: the last expert dropped, no window
        before, after = (j < big_j).view(1, groups + 1, 1, groups), (j > big_j).view(1, groups + 1, 1, groups)
        score_low = (v_low[..., 0] + v_low[..., 1]).view(t, 1, 1, groups)
        score_high = (v_high[..., 0] + v_high[..., 1]).view(t, 1, 1, groups)
        group_scores = torch.where(before, score_low, torch.where(after, score_high, mid.unsqueeze(3)))
        # The best topk_group groups by rank (a top-k over rows this short costs more than comparing).
        a, b = group_scores.unsqueeze(4), group_scores.unsqueeze(3)  # [..., a, b]: group b ahead of group a?
        ahead = (b > a) | ((b == a) & (j.view(1, -1) < j.view(-1, 1)))
        rank = ahead.view(torch.uint8).sum(4, dtype=torch.uint8)
        chosen = (rank < self.topk_group).nonzero()[:, 3].view(t, groups + 1, 3, self.topk_group)
        cand_v = torch.stack([v_low, v_high, v_win], 1).view(t, 3 * groups, width)
        cand_p = torch.stack([p_low, p_high, p_win], 1).view(t, 3 * groups, width)
        at_j = big_j.view(1, groups + 1, 1, 1)
        kind = torch.where(chosen < at_j, 0, torch.where(chosen > at_j, 1, 2))
        flat = (kind * groups + chosen).view(t, -1, 1).expand(-1, -1, width)
        vals = cand_v.gather(1, flat).view(t, groups + 1, 3, -1)
        pos = cand_p.gather(1, flat).view(t, groups + 1, 3, -1)
        # Cases 1 and 2 drop the window's best or second best.
        w3_pos = torch.cat([p_win[..., :2], p_win.new_full((t, 1, 2), -1)], 1)
        gone = torch.cat([w3_pos.new_full((t, groups + 1, 1), -2), w3_pos], 2)  # [t, groups + 1, 3]
        vals = vals.masked_fill(pos == gone.unsqueeze(3), float("-inf"))
        top = pos.gather(3, vals.topk(k + 1, dim=-1)[1])  # [t, groups + 1, 3, k + 1], best first
        # Child i uses its group's case; in case 0 a child whose expert is among the first k routes
        # to the k + 1 without it (a row of its own), the others to the first k.
        i = torch.arange(big_m, device=dev)
        part = torch.div(i, per, rounding_mode="floor")
        case = torch.where(i.view(1, -1) == w3_pos[:, part, 0], 1, torch.where(i.view(1, -1) == w3_pos[:, part, 1], 2, 0))
        use = (torch.arange(t, device=dev).view(-1, 1) * (groups + 1) + part.view(1, -1)) * 3 + case  # [t, M]
        first = top[:, :, 0, :k]  # [t, groups + 1, k]
        own = (torch.div(first, per, rounding_mode="floor") == j_all.view(1, -1, 1)) & (first != w3_pos[..., :1]) & (
            first != w3_pos[..., 1:])  # [t, groups + 1, k]: case-0 children whose expert is routed to
        at = own.nonzero()  # (token, J, place)
        base_rows = top[..., :k].reshape(-1, k)
        ks = torch.arange(k, device=dev).view(1, k)
        own_rows = top[at[:, 0], at[:, 1], 0].gather(1, ks + (ks >= at[:, 2:]).long())  # [R', k]: without it
        use[at[:, 0], first[at[:, 0], at[:, 1], at[:, 2]]] = base_rows.shape[0] + torch.arange(at.shape[0], device=dev)
        positions = torch.cat([base_rows, own_rows])
        tok = torch.cat([torch.arange(t, device=dev).repeat_interleave(3 * (groups + 1)), at[:, 0]])
        # Keep the rows some child uses.
        used = torch.zeros(positions.shape[0], dtype=torch.bool, device=dev)
        used[use.view(-1)] = True
        index = used.cumsum(0) - 1
        positions, tok, use = positions[used], tok[used], index[use]
        weights = scores[tok.unsqueeze(1), positions]
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self.eps)
        return ChildRoutes(tok, weights * self.scale, positions, use)

    def __call__(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores, choice = self._scores(logits, bias)
        t, m = choice.shape
        if self.n_group > 1:
            per = m // self.n_group
            group_scores = choice.view(t, self.n_group, per).topk(2, dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
            mask = mask.unsqueeze(-1).expand(t, self.n_group, per).reshape(t, m)
            choice = choice.masked_fill(~mask.bool(), self.masked_value)
        idx = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self.eps)
        return weights * self.scale, idx


@dataclass(frozen=True)
class LogitBiasSigmoidTopK:
    """Kolibri: experts chosen by ``logits + bias``; weights ``sigmoid(logit)`` of the chosen,
    optionally renormalised."""

    local = True  # per-expert choice; weights from the chosen logits (see is_local)
    row_bias = True  # the bias may also be one row per token, [T, m]
    top_k: int
    renormalize: bool

    def __call__(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()
        choice = logits if bias is None else logits + bias.float()
        idx = torch.topk(choice, self.top_k, dim=-1)[1]
        weights = logits.gather(1, idx).sigmoid()
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, idx


@dataclass(frozen=True)
class TopKScores:
    """Cohere2-MoE: top-k of the logits, then softmax over those k, or their sigmoid (optionally
    renormalised); times ``scale``."""

    local = True  # per-expert choice; weights from the chosen logits (see is_local)
    top_k: int
    activation: str  # "softmax" or "sigmoid"
    renormalize: bool = False
    scale: float = 1.0

    def __call__(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        values, idx = torch.topk(logits, self.top_k, dim=-1)
        if self.activation == "softmax":
            weights = torch.softmax(values.float(), dim=-1)
        else:
            weights = torch.sigmoid(values.float())
            if self.renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.scale, idx


@dataclass(frozen=True)
class TopKSoftmax:
    """Top-k of the logits, softmax over those k (GraniteMoE, gpt-oss): renormalised by construction."""

    local = True  # per-expert choice; weights from the chosen logits (see is_local)
    top_k: int

    def __call__(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        values, idx = torch.topk(logits, self.top_k, dim=-1)
        return torch.softmax(values.float(), dim=-1), idx


@dataclass(frozen=True)
class SoftmaxBiasTopK:
    """ERNIE-4.5-MoE: ``p = softmax(logits)``; experts chosen by ``p + bias``; weights are ``p`` of
    the chosen experts divided by ``max(sum, norm_min)``."""

    top_k: int
    norm_min: float

    def __call__(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(logits.float(), dim=-1)
        choice = probs if bias is None else probs + bias.float().reshape(-1)
        idx = torch.topk(choice, self.top_k, dim=-1)[1]
        weights = probs.gather(-1, idx)
        return weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=self.norm_min), idx


@dataclass(frozen=True)
class SparseMixer:
    """PhiMoE's ``sparsemixer`` at inference (deterministic outside training), always top-2.

    Expert 1 is the arg-max logit; its weight is its softmax probability over the logits within
    ``2 * jitter_eps`` (relative) of the maximum. Expert 2 is the arg-max of the rest, weighted the
    same way among the remaining logits. The two weights are not renormalised.
    """

    top_k: int
    jitter_eps: float

    def __call__(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = logits.float()
        weights, indices = [], []
        masked = scores
        for _ in range(self.top_k):
            top, idx = masked.max(dim=-1, keepdim=True)
            factor = scores.abs().clamp(min=top)
            far = ((top - scores) / factor) > (2 * self.jitter_eps)
            gates = torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1)
            weights.append(gates.gather(-1, idx))
            indices.append(idx)
            masked = torch.scatter(masked, -1, idx, float("-inf"))
        return torch.cat(weights, dim=-1), torch.cat(indices, dim=-1)


@dataclass(frozen=True)
class TopKUnitWeights:
    """Top-k of the logits with weight 1 each (Llama 4: the router's sigmoid scales the expert's
    *input*, which the adapter folds into the expert outputs, so the output weights are 1)."""

    local = True  # per-expert choice; weights from the chosen logits (see is_local)
    top_k: int

    def __call__(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.topk(logits, self.top_k, dim=-1)[1]
        return torch.ones(idx.shape, dtype=torch.float32, device=logits.device), idx
