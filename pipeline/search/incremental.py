"""Incremental scoring of kept-expert sets for greedy and beam search on fine-grained MoEs (docs/search.md).

:class:`LazyScorer` computes an expert's output on a token only when some scored set routes that
token to it, or will within ``prefetch`` levels (below). Each token keeps the outputs it has so far in *slots*, with their float64 Gram matrix
``G`` and ``u = G a(full)``; a set's squared output error on a token is then
``a^T G a - 2 a(S)^T u + a(S)^T G a(S)`` over the token's slots, as in :mod:`pipeline.search.scoring`.

:meth:`LazyScorer.children` scores every set ``S - {e}`` of a parent ``S`` at once. When the
pruned routing rule is local (:func:`~pipeline.models.routing.is_local`), dropping ``e`` changes a
token's routing only if ``e`` is among the experts that rule picks for the token on ``S``; the
child then routes to those experts with ``e`` swapped for the token's ``(k + 1)``-th. So the
parent's per-token errors are computed once, and each child recomputes only the tokens routed to
its dropped expert: ``k`` rows per token for all ``|S|`` children together, instead of ``|S|``.
Per-batch sums of squared errors are updated, then ``loss = sum_b sqrt(.)`` (method.md §2).
The parents of one beam level are scored together, each token's rows once per distinct top
``k + 1`` among them, and a level that needs new outputs computes each parent's top
``k + 1 + prefetch`` at once (the sets of the next levels route within them).

Group-limited rules that route every drop-one child at once (:func:`~pipeline.models.routing.routes_children`)
score each distinct child routing once (``drop_one``). Other rules score every child in full
(:meth:`LazyScorer.losses`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pipeline.models.base import MoEAdapter
from pipeline.models.routing import is_local, routes_children
from pipeline.search.scoring import SCORE_ELEMENTS, CandidateRouter, RoutingStats, TokenLayout

#: Expert-output elements converted to float64 at a time for new Gram rows.
GRAM_ROW_ELEMENTS = 1 << 22
#: Initial slots per token (grown by doubling).
INITIAL_SLOTS = 16
#: Experts beyond the top ``k + 1`` whose outputs a local level computes ahead when it computes any.
PREFETCH = 8


@dataclasses.dataclass(frozen=True)
class _Runs:
    """Drop-one children of a parent on every token, each distinct routing stored once.

    Row ``r`` routes token ``tok[r]`` to ``ids[r]`` with weights ``w[r]`` ``[k]``; token ``t``'s
    child ``i`` uses row ``run[t, i]``.
    """

    tok: torch.Tensor
    w: torch.Tensor
    ids: torch.Tensor
    run: torch.Tensor


class LazyScorer:
    """Scores kept-expert sets of one MoE block on fixed tokens, computing expert outputs on demand.

    Same interface as :class:`~pipeline.search.scoring.LayerScorer` (``prepare``, ``stats``,
    ``losses``, ``close``) plus :meth:`children`. ``x`` is ``[N, L, d]`` or ``[T, d]`` in sequence
    order; a loss batch is ``tokens_per_batch`` consecutive tokens; experts run on at most
    ``token_chunk`` tokens at a time. Memory: ``T x slots x (d x dtype bytes + slots x 8)``, where
    ``slots`` is the most outputs any one token holds (routed to by scored sets, or computed ahead).
    """

    def __init__(
        self,
        adapter: MoEAdapter,
        block: nn.Module,
        config: Any,
        x: torch.Tensor,
        *,
        tokens_per_batch: int,
        token_chunk: int,
        device: torch.device | str = "cpu",
        prefetch: int = PREFETCH,
    ) -> None:
        self.adapter = adapter
        self.prefetch = prefetch
        self.block = block
        self.config = config
        self.x = x.reshape(-1, x.shape[-1])
        self.device = torch.device(device)
        self.n = adapter.block_num_experts(block)
        self.k = adapter.top_k(config)
        self.layout = TokenLayout(self.x.shape[0], tokens_per_batch, token_chunk)
        self.router = CandidateRouter(adapter, block, config)
        self.stats: RoutingStats | None = None
        self.subset_size: int | None = None
        #: (token, expert) outputs computed so far.
        self.expert_evals = 0
        self.q = 0
        self._dtype = next(block.parameters()).dtype

    # -- the token slots ---------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self) -> None:
        """Router logits, the full model's routing and its experts' outputs; afterwards sets can be scored."""
        t_all, n, k, dev = self.x.shape[0], self.n, self.k, self.device
        self.logits = torch.empty(t_all, n, dtype=torch.float32, device=dev)
        w_full = torch.empty(t_all, k, dtype=torch.float64, device=dev)
        ids_full = torch.empty(t_all, k, dtype=torch.long, device=dev)
        for start, end in self.layout.chunks():
            xs = self.x[start:end].to(dev, self._dtype)
            self.logits[start:end] = self.adapter.router_logits(self.block, xs).float()
            w, ids = self.adapter.route(self.block, self.logits[start:end], self.config)
            w_full[start:end], ids_full[start:end] = w.double(), ids.long()
        bias = self.adapter.choice_bias(self.block)
        self.bias = None if bias is None else bias.detach().float().to(dev)
        self.slot_of = torch.full((t_all, n), -1, dtype=torch.long, device=dev)
        self.count = torch.zeros(t_all, dtype=torch.long, device=dev)
        self.q = 0
        self._alloc(min(INITIAL_SLOTS, n))
        self.a_full = w_full
        self.slots_full: torch.Tensor | None = None
        tok = torch.arange(t_all, device=dev)
        self.ensure(tok.repeat_interleave(k), ids_full.reshape(-1))
        self.slots_full = self.slot_of.gather(1, ids_full)
        self._update_u(tok.repeat_interleave(k), self.slots_full.reshape(-1))
        g = self._gram_at(tok, self.slots_full)
        self.zz = torch.einsum("ta,tab,tb->t", w_full, g, w_full)
        norms = g.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        counts = torch.bincount(ids_full.reshape(-1), minlength=n)
        reap = torch.zeros(n, dtype=torch.float64, device=dev)
        reap.scatter_add_(0, ids_full.reshape(-1), (w_full * norms).reshape(-1))
        self.stats = RoutingStats(counts=counts.cpu(), reap_sum=reap.cpu(), tokens=t_all)

    def _alloc(self, q: int) -> None:
        """(Re)allocate ``q`` slots per token, keeping what the current slots hold."""
        t_all, d = self.x.shape
        out = torch.zeros(t_all, q, d, dtype=self._dtype, device=self.device)
        gram = torch.zeros(t_all, q, q, dtype=torch.float64, device=self.device)
        u = torch.zeros(t_all, q, dtype=torch.float64, device=self.device)
        if self.q:
            p = self.q
            out[:, :p], gram[:, :p, :p], u[:, :p] = self.out, self.gram, self.u
        self.q, self.out, self.gram, self.u = q, out, gram, u

    def _gram_at(self, tok: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``G[tok, slots_a, slots_b]`` ``[R, j, j]`` for rows ``tok [R]`` and slots ``[R, j]``."""
        q = self.q
        flat = (tok * (q * q)).view(-1, 1, 1) + slots.unsqueeze(2) * q + slots.unsqueeze(1)
        return self.gram.view(-1).index_select(0, flat.reshape(-1)).view(flat.shape)

    @torch.no_grad()
    def ensure(self, tok: torch.Tensor, experts: torch.Tensor) -> None:
        """Compute the outputs (and Gram entries) of the (token, expert) pairs not computed yet."""
        have = self.slot_of[tok, experts]
        miss = have < 0
        if not bool(miss.any()):
            return
        pairs = torch.unique(tok[miss] * self.n + experts[miss])  # sorted: token-major
        t, e = pairs // self.n, pairs % self.n
        _, per_token = torch.unique_consecutive(t, return_counts=True)
        starts = torch.cumsum(per_token, 0) - per_token
        rank = torch.arange(t.numel(), device=t.device) - starts.repeat_interleave(per_token)
        slot = self.count[t] + rank
        need = int(slot.max()) + 1
        if need > self.q:
            q = self.q
            while q < need:
                q *= 2
            self._alloc(min(q, self.n))
        self.slot_of[t, e] = slot
        self.count.index_add_(0, t, torch.ones_like(t))
        self.expert_evals += int(t.numel())
        chunk = self.layout.token_chunk
        for c0 in range(0, t.numel(), chunk):
            tc, ec = t[c0 : c0 + chunk], e[c0 : c0 + chunk]
            xs = self.x.index_select(0, tc.to(self.x.device)).to(self.device, self._dtype)
            self.out[tc, slot[c0 : c0 + chunk]] = self.adapter.expert_outputs_at(self.block, xs, ec)
        # Gram rows of each token's new slots against its filled ones, the token's outputs converted once.
        tu = t[starts]
        new_max, filled = int(per_token.max()), int(self.count[tu].max())
        pick = (starts.unsqueeze(1) + torch.arange(new_max, device=t.device)).minimum((starts + per_token - 1).unsqueeze(1))
        new_slots = slot[pick]  # [U, new_max], padded by repeating a token's last new slot
        cols = torch.arange(filled, device=t.device)
        step = max(1, GRAM_ROW_ELEMENTS // (filled * self.x.shape[1]))
        for c0 in range(0, tu.numel(), step):
            tc, sc = tu[c0 : c0 + step], new_slots[c0 : c0 + step]
            outs = self.out[tc, :filled].double()  # [u, filled, d]
            rows = torch.bmm(outs.gather(1, sc.unsqueeze(2).expand(-1, -1, outs.shape[2])), outs.transpose(1, 2))
            self.gram[tc.view(-1, 1, 1), sc.unsqueeze(2), cols.view(1, 1, -1)] = rows
            self.gram[tc.view(-1, 1, 1), cols.view(1, -1, 1), sc.unsqueeze(1)] = rows.transpose(1, 2)
        if self.slots_full is not None:
            self._update_u(t, slot)

    def _update_u(self, tok: torch.Tensor, slot: torch.Tensor) -> None:
        assert self.slots_full is not None
        q = self.q
        flat = (tok * (q * q) + slot * q).unsqueeze(1) + self.slots_full[tok]
        self.u[tok, slot] = (self.gram.view(-1)[flat] * self.a_full[tok]).sum(1)

    def err2(self, tok: torch.Tensor, w: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Squared output error ``[R]`` of tokens ``tok [R]`` routed as ``(w, experts)`` ``[R, j]`` (computed pairs)."""
        slots = self.slot_of[tok.unsqueeze(1), experts]
        w64 = w.double()
        out = torch.empty(tok.numel(), dtype=torch.float64, device=self.device)
        step = max(1, SCORE_ELEMENTS // max(1, slots.shape[1] ** 2))
        for c0 in range(0, tok.numel(), step):
            tc, sc, wc = tok[c0 : c0 + step], slots[c0 : c0 + step], w64[c0 : c0 + step]
            quad = torch.einsum("ra,rab,rb->r", wc, self._gram_at(tc, sc), wc)
            lin = (wc * self.u[tc.unsqueeze(1), sc]).sum(1)
            out[c0 : c0 + step] = self.zz[tc] - 2.0 * lin + quad
        return out

    def _err2_local(self, a: torch.Tensor, gram: torch.Tensor, u: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """Squared errors ``[t, c]`` of weights ``a [t, c, j]`` over each token's ``j`` experts with Gram ``[t, j, j]``, ``u [t, j]``."""
        quad = (torch.bmm(a, gram) * a).sum(2)
        return self.zz[tok].unsqueeze(1) - 2.0 * (a * u.unsqueeze(1)).sum(2) + quad

    # -- scoring ---------------------------------------------------------------------------------
    def _rule(self, m: int) -> Any:
        return self.router.rule(m)

    @torch.no_grad()
    def losses(self, kept: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Loss of each kept set (rows of ascending expert ids, all of one size) -> ``[C]`` float64 (CPU)."""
        if self.stats is None:
            raise RuntimeError("call prepare() before losses()")
        kept_t = torch.as_tensor(kept, dtype=torch.long).to(self.device)
        if kept_t.dim() != 2 or kept_t.shape[1] < self.k:
            raise ValueError(f"kept sets must be a [C, m] table with m >= top_k={self.k}")
        c = kept_t.shape[0]
        acc = torch.zeros(c, self.layout.num_batches, dtype=torch.float64, device=self.device)
        for start, end in self.layout.chunks():
            t = end - start
            g = max(1, min(c, SCORE_ELEMENTS // max(1, t * (self.k + 2))))
            tok = torch.arange(start, end, device=self.device)
            for c0 in range(0, c, g):
                w, ids = self.router(self.logits[start:end], kept_t[c0 : c0 + g])  # [k, t, g]
                rows_w = w.permute(2, 1, 0).reshape(-1, w.shape[0])  # [g * t, k], candidate-major
                rows_id = ids.permute(2, 1, 0).reshape(-1, ids.shape[0])
                rows_tok = tok.repeat(w.shape[2])
                self.ensure(rows_tok.repeat_interleave(rows_id.shape[1]), rows_id.reshape(-1))
                err = self.err2(rows_tok, rows_w, rows_id).view(w.shape[2], t)
                self.layout.batch_sums(start, end, err, acc[c0 : c0 + g])
        return acc.clamp_min_(0).sqrt_().sum(1).cpu()

    @torch.no_grad()
    def children(self, parents: Sequence[Sequence[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each parent, every set ``parent - {e}`` and its loss: ``(kept [m, m - 1] ascending, losses [m] float64)``.

        Row ``i`` drops the ``i``-th expert of the parent (ascending ids). The outputs that the
        parents' children need are computed together, before any child is scored.
        """
        if self.stats is None:
            raise RuntimeError("call prepare() before children()")
        pars = [torch.tensor(sorted(int(e) for e in parent), dtype=torch.long, device=self.device) for parent in parents]
        plans: list[torch.Tensor | _Runs | None] = []
        for par in pars:
            rule = self._rule(par.numel() - 1)
            by_rule = (
                self.router.by_rule and par.numel() - 1 >= self.k
                and (self.bias is None or getattr(rule, "row_bias", False))
            )
            if by_rule and is_local(rule):
                plans.append(self._top(par, rule, self.k + 1))
            elif by_rule and routes_children(rule) and (par.numel() - 1) % rule.n_group == 0:
                plans.append(self._runs(par, rule))
            else:
                plans.append(None)
        tops = [plan for plan in plans if isinstance(plan, torch.Tensor)]
        tok = torch.arange(self.layout.num_tokens, device=self.device).unsqueeze(1)
        if self.prefetch and any(bool((self.slot_of[tok, top] < 0).any()) for top in tops):
            # A descendant i levels down routes within its ancestor's top k + 1 + i (local rules rank
            # experts alone): computing the parents' next experts now saves the next levels a pass
            # over every expert's weights for a few new tokens each.
            tops = [self._top(par, self._rule(par.numel() - 1), self.k + 1 + self.prefetch)
                    for par, plan in zip(pars, plans, strict=True) if isinstance(plan, torch.Tensor)]
        need_tok, need_id = [], []
        for plan in plans:
            if isinstance(plan, _Runs):
                need_tok.append(plan.tok.repeat_interleave(self.k)), need_id.append(plan.ids.reshape(-1))
        for top in tops:
            need_tok.append(tok.expand_as(top).reshape(-1)), need_id.append(top.reshape(-1))
        if need_tok:
            self.ensure(torch.cat(need_tok), torch.cat(need_id))
        local_losses: dict[int, torch.Tensor] = {}
        for size in sorted({pars[i].numel() for i, plan in enumerate(plans) if isinstance(plan, torch.Tensor)}):
            local = [i for i, plan in enumerate(plans) if isinstance(plan, torch.Tensor) and pars[i].numel() == size]
            tops_of = [plans[i] for i in local]
            losses_of = self._children_losses_many([pars[i] for i in local], self._rule(size - 1), tops_of)  # type: ignore[arg-type]
            local_losses.update(zip(local, losses_of, strict=True))
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, (par, plan) in enumerate(zip(pars, plans, strict=True)):
            m = par.numel()
            kept = par.unsqueeze(0).expand(m, m).masked_select(~torch.eye(m, dtype=torch.bool, device=self.device))
            kept = kept.view(m, m - 1)
            if plan is None:
                out.append((kept.cpu(), self.losses(kept)))
            elif isinstance(plan, _Runs):
                out.append((kept.cpu(), self._runs_losses(plan)))
            else:
                out.append((kept.cpu(), local_losses[i]))
        return out

    def _runs(self, par: torch.Tensor, rule: Any) -> _Runs:
        """Every child's routing on every token by ``rule.drop_one``, each distinct routing once."""
        m, k, t_all = par.numel(), self.k, self.layout.num_tokens
        bias = None if self.bias is None else self.bias[par]
        groups = rule.n_group  # drop_one's values per token: 3 (groups + 1) (groups^2 + 2 topk_group (k + 1)) + 2 m
        step = max(1, SCORE_ELEMENTS // (3 * (groups + 1) * (groups**2 + 2 * rule.topk_group * (k + 1)) + 2 * m))
        toks, ws, ids, run = [], [], [], torch.empty(t_all, m, dtype=torch.long, device=self.device)
        rows = 0
        for s0 in range(0, t_all, step):
            s1 = min(s0 + step, t_all)
            routes = rule.drop_one(self.logits[s0:s1].index_select(1, par), bias)
            run[s0:s1] = routes.use + rows
            rows += routes.tok.numel()
            toks.append(routes.tok + s0), ws.append(routes.weights), ids.append(par[routes.positions])
        return _Runs(torch.cat(toks), torch.cat(ws), torch.cat(ids), run)

    def _runs_losses(self, runs: _Runs) -> torch.Tensor:
        """Losses ``[m]`` of the children routed by :meth:`_runs` (their outputs computed)."""
        m, nb = runs.run.shape[1], self.layout.num_batches
        err = self.err2(runs.tok, runs.w, runs.ids)
        acc = torch.zeros(m, nb, dtype=torch.float64, device=self.device)
        for start, end in self.layout.chunks():
            self.layout.batch_sums(start, end, err[runs.run[start:end]].t(), acc)
        return acc.clamp_min_(0).sqrt_().sum(1).cpu()

    def _top(self, par: torch.Tensor, rule: Any, top_k: int) -> torch.Tensor:
        """Each token's top ``top_k`` experts of ``par`` (at most all) under ``rule`` ``[T, top_k]``."""
        wider = dataclasses.replace(rule, top_k=min(top_k, par.numel()))
        bias = None if self.bias is None else self.bias[par]
        return torch.cat([par[wider(self.logits[s:e].index_select(1, par), bias)[1]] for s, e in self.layout.chunks()])

    def _local_errors(self, rule: Any, tok: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rows of a token ``tok [R]`` and a parent's top ``k + 1`` there ``top [R, k + 1]`` (computed):
        the parent's squared error under the child's ``rule`` ``[R]``, the ``k`` experts it routes
        to ``[R, k]`` and, for the child dropping each, the change in squared error ``[R, k]``."""
        k = self.k
        # others[p]: the positions 0..k other than p, for the k + 1 experts a token may use.
        others = torch.arange(k + 1, device=self.device).expand(k + 1, k + 1)
        others = others.masked_select(~torch.eye(k + 1, dtype=torch.bool, device=self.device)).view(k + 1, k)
        err_b = torch.empty(tok.numel(), dtype=torch.float64, device=self.device)
        routed = torch.empty(tok.numel(), k, dtype=torch.long, device=self.device)
        diff = torch.empty(tok.numel(), k, dtype=torch.float64, device=self.device)
        step = max(1, SCORE_ELEMENTS // ((k + 1) ** 2 * (k + 2)))
        for r0 in range(0, tok.numel(), step):
            tk, tp = tok[r0 : r0 + step], top[r0 : r0 + step]
            t = tk.numel()
            top_logits = self.logits[tk.unsqueeze(1), tp]
            top_bias = None if self.bias is None else self.bias[tp]
            slots = self.slot_of[tk.unsqueeze(1), tp]
            gram = self._gram_at(tk, slots)  # [t, k + 1, k + 1]
            u = self.u[tk.unsqueeze(1), slots]
            # The parent's routing under the child's rule is the rule on its top k + 1 (the rule is local).
            w_b, loc_b = rule(top_logits, top_bias)
            a_b = torch.zeros(t, 1, k + 1, dtype=torch.float64, device=self.device)
            a_b.scatter_(2, loc_b.unsqueeze(1), w_b.double().unsqueeze(1))
            # The child dropping tp[t, p] (p in loc_b[t]) routes token t among the other k of the k + 1.
            pos = others[loc_b]  # [t, k, k]
            w_c, loc_c = rule(top_logits.gather(1, pos.view(t, -1)).view(t * k, k),
                              None if top_bias is None else top_bias.gather(1, pos.view(t, -1)).view(t * k, k))
            a_c = torch.zeros(t, k, k + 1, dtype=torch.float64, device=self.device)
            a_c.scatter_(2, pos.gather(2, loc_c.view(t, k, k)), w_c.double().view(t, k, k))
            e_b = self._err2_local(a_b, gram, u, tk).squeeze(1)
            err_b[r0 : r0 + t] = e_b
            routed[r0 : r0 + t] = tp.gather(1, loc_b)
            diff[r0 : r0 + t] = self._err2_local(a_c, gram, u, tk) - e_b.unsqueeze(1)
        return err_b, routed, diff

    def _children_losses_many(self, pars: list[torch.Tensor], rule: Any, tops: list[torch.Tensor]) -> list[torch.Tensor]:
        """Losses ``[m]`` of the sets ``par - {e}`` of parents of one size, each parent's top ``k + 1``
        per token given and computed. A token's rows are computed once per distinct top ``k + 1``
        among the parents (beam parents share most of them)."""
        p_all, t_all, k, nb = len(pars), self.layout.num_tokens, self.k, self.layout.num_batches
        top = torch.stack(tops)  # [P, T, k + 1]
        key = top.sort(dim=2).values
        first = torch.arange(p_all, device=self.device).view(-1, 1).expand(p_all, t_all).clone()
        for q in range(p_all - 1, -1, -1):  # the first parent with the same top k + 1 on the token
            same = (key == key[q]).all(dim=2)
            same[: q + 1] = False
            first[same] = q
        own = first == torch.arange(p_all, device=self.device).view(-1, 1)
        row_of = torch.full((p_all, t_all), -1, dtype=torch.long, device=self.device)
        row_of[own] = torch.arange(int(own.sum()), device=self.device)
        where = own.nonzero()  # (parent, token), parent-major
        err_b, routed, diff = self._local_errors(rule, where[:, 1], top[where[:, 0], where[:, 1]])
        rows = row_of.gather(0, first)  # [P, T]
        out = []
        for p, par in enumerate(pars):
            m = par.numel()
            position = torch.full((self.n,), -1, dtype=torch.long, device=self.device)
            position[par] = torch.arange(m, device=self.device)
            base = torch.zeros(1, nb, dtype=torch.float64, device=self.device)
            delta = torch.zeros(m, nb, dtype=torch.float64, device=self.device)
            for start, end in self.layout.chunks():
                r = rows[p, start:end]
                self.layout.batch_sums(start, end, err_b[r].unsqueeze(0), base)
                # Each token's k dropped experts are distinct: a scatter, then contiguous per-batch sums.
                per_child = torch.zeros(end - start, m, dtype=torch.float64, device=self.device)
                per_child.scatter_(1, position[routed[r]], diff[r])
                self.layout.batch_sums(start, end, per_child.t(), delta)
            out.append((base + delta).clamp_min_(0).sqrt_().sum(1).cpu())
        return out

    def close(self) -> None:
        """Drop the cached outputs."""
        for name in ("out", "gram", "u", "logits", "slot_of"):
            if hasattr(self, name):
                delattr(self, name)
        self.q = 0
