"""Fast scoring of kept-expert sets from one pass over a layer's experts (method.md §6).

For a token ``x`` and a kept set ``S`` the block output error is ``e(S) = sum_i c_i E_i(x)`` with
``c = a(full) - a(S)`` (routing weights, zero outside the routed experts; shared experts cancel), so
``||e(S)||^2 = c^T G c`` where ``G_ij = <E_i(x), E_j(x)>``. :class:`LayerScorer` runs the layer's
experts once per chunk of calibration tokens, keeps per chunk the router logits, the upper triangle
of ``G``, ``u = G a(full)`` and ``a(full)^T G a(full)`` (in float64, in memory up to a byte budget,
beyond it spilled to safetensors files), and then scores any number of candidates from those alone:
``||e||^2 = a^T G a - 2 a(S)^T u + a(S)^T G a(S)``, ``O(k^2)`` per token and candidate, batched over
candidates. ``loss(S) = sum_b sqrt(sum_{t in b} ||e_t(S)||^2)`` over calibration batches ``b``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.io import load_tensors, remove_path, save_tensors
from pipeline.models.base import MoEAdapter
from pipeline.models.routing import SoftmaxTopK

log = logging.getLogger(__name__)

#: Elements of one ``[tokens, candidates, terms]`` scoring intermediate (bounds scoring memory).
SCORE_ELEMENTS = 1 << 22
#: Expert-output elements converted to float64 at a time for the Gram matrices on the CPU.
GRAM_BLOCK_ELEMENTS = 1 << 18
#: Default bytes of per-chunk Gram data kept in memory before spilling to disk.
CACHE_BYTES = 2 << 30


# -- tokens: loss batches and expert-pass chunks -------------------------------------------------
@dataclass(frozen=True)
class TokenLayout:
    """How ``num_tokens`` calibration tokens split into loss batches and expert-pass chunks.

    Batch ``b`` is tokens ``[b * tokens_per_batch, (b + 1) * tokens_per_batch)`` (the last may be
    shorter). A chunk holds whole batches, or part of a single batch when a batch is longer than
    ``token_chunk``, so per-batch sums never straddle chunks in a way that changes their meaning.
    """

    num_tokens: int
    tokens_per_batch: int
    token_chunk: int

    def __post_init__(self) -> None:
        if self.num_tokens <= 0 or self.tokens_per_batch <= 0 or self.token_chunk <= 0:
            raise ValueError("token counts must be positive")

    @property
    def num_batches(self) -> int:
        """Number of loss batches."""
        return -(-self.num_tokens // self.tokens_per_batch)

    def chunks(self) -> list[tuple[int, int]]:
        """Token ranges ``[start, end)`` of the expert-pass chunks, in order."""
        tpb, total = self.tokens_per_batch, self.num_tokens
        out: list[tuple[int, int]] = []
        if tpb <= self.token_chunk:
            step = (self.token_chunk // tpb) * tpb
            for start in range(0, total, step):
                out.append((start, min(start + step, total)))
            return out
        for b_start in range(0, total, tpb):
            b_end = min(b_start + tpb, total)
            for start in range(b_start, b_end, self.token_chunk):
                out.append((start, min(start + self.token_chunk, b_end)))
        return out

    def batch_sums(self, start: int, end: int, values: torch.Tensor, acc: torch.Tensor) -> None:
        """Add per-token ``values [C, end - start]`` of chunk ``[start, end)`` into ``acc [C, num_batches]``.

        Every sum runs along contiguous rows, so a candidate's result does not depend on which other
        candidates share its batch of work, and no atomics are involved (deterministic on CUDA too).
        """
        tpb = self.tokens_per_batch
        first = start // tpb
        if start % tpb or end - start <= tpb and (end - 1) // tpb == first:
            acc[:, first] += values.sum(1)
            return
        whole = (end - start) // tpb
        if whole:
            acc[:, first : first + whole] += values[:, : whole * tpb].reshape(values.shape[0], whole, tpb).sum(2)
        if whole * tpb < end - start:
            acc[:, first + whole] += values[:, whole * tpb :].sum(1)


# -- routing every candidate at once -------------------------------------------------------------
#: Logit gap (relative to the logits' scale) below which two experts count as tied for the fast router.
TIE_TOLERANCE = 1e-5
#: Logit spread beyond which float32 softmax probabilities can underflow into ties.
UNDERFLOW_SPREAD = 80.0
#: Most experts the fast router handles (kept sets are float64 bit masks).
FAST_ROUTER_MAX_EXPERTS = 52


def _fast_rule(rule: Any) -> bool:
    """Whether ``rule`` is the softmax-top-k rule with exactly the settings the fast router implements."""
    known = {"top_k", "renormalize", "scale", "cast_to_logits_dtype"}
    return type(rule) is SoftmaxTopK and {f.name for f in dataclasses.fields(rule)} == known


class CandidateRouter:
    """Routing weights and ids of many kept sets at once, as ``adapter.route`` computes them.

    * When the family overrides :meth:`MoEAdapter.route`, or has a per-expert selection bias and a
      rule that takes no bias row per token (``row_bias``), the adapter's own ``route`` runs once
      per candidate.
    * Otherwise the rule of the pruned config runs on every candidate's logits in one batched call
      (rules act row by row, so this is the same computation).
    * For the softmax-top-k rule (:class:`SoftmaxTopK`: Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2 greedy)
      a vectorised equivalent avoids per-row softmax/top-k kernels: the top-k of a kept set are its
      experts of highest logit (softmax is monotone) and the weights follow in closed form. Tokens
      whose logits nearly tie, or spread so far that probabilities underflow (where rounding could
      reorder or tie probabilities), take the batched rule, so ids always equal the rule's and
      weights agree to float32 rounding.
    """

    def __init__(self, adapter: MoEAdapter, block: nn.Module, config: Any) -> None:
        self.adapter = adapter
        self.block = block
        self.config = config
        self.n = adapter.block_num_experts(block)
        self._rules: dict[int, Any] = {}
        #: Whether the family routes through its rule (:meth:`MoEAdapter.route` not overridden).
        self.by_rule = type(adapter).route is MoEAdapter.route
        bias = adapter.choice_bias(block)
        self.bias = None if bias is None else bias.detach().float()
        self.batched = self.by_rule and bias is None

    def rule(self, m: int) -> Any:
        """The routing rule of a model keeping ``m`` experts."""
        if m not in self._rules:
            cfg = self.config if m == self.n else self.adapter.pruned_config(self.config, m)
            self._rules[m] = self.adapter.routing_rule(cfg)
        return self._rules[m]

    def __call__(self, logits: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits [T, n]``, ``kept [C, m]`` (ascending ids) -> weights ``[k, T, C]`` float32, ids ``[k, T, C]``."""
        rule = self.rule(kept.shape[1]) if self.by_rule else None
        if not self.batched and not (self.by_rule and getattr(rule, "row_bias", False)):
            outs = [self.adapter.route(self.block, logits, self.config, row.tolist()) for row in kept]
            weights = torch.stack([w.float().t() for w, _ in outs], 2)
            return weights.contiguous(), torch.stack([i.long().t() for _, i in outs], 2).contiguous()
        if self.bias is not None:  # a rule that takes a bias row per token: each candidate's own bias
            return self._batched(rule, logits, kept, self.bias.to(logits.device))
        if _fast_rule(rule) and self.n <= FAST_ROUTER_MAX_EXPERTS and logits.dtype == torch.float32:
            return self._softmax_topk(rule, logits, kept)
        return self._batched(rule, logits, kept)

    @staticmethod
    def _batched(
        rule: Any, logits: torch.Tensor, kept: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = logits.shape[0]
        c, m = kept.shape
        sub = logits.index_select(1, kept.reshape(-1)).view(t * c, m)
        rows_bias = None if bias is None else bias[kept].unsqueeze(0).expand(t, c, m).reshape(t * c, m)
        weights, local = rule(sub, rows_bias)
        k = weights.shape[-1]
        offsets = torch.arange(c, device=kept.device).mul_(m).view(1, c, 1)
        ids = kept.reshape(-1)[local.view(t, c, k) + offsets]
        return weights.view(t, c, k).float().permute(2, 0, 1).contiguous(), ids.permute(2, 0, 1).contiguous()

    def _softmax_topk(self, rule: SoftmaxTopK, logits: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, n = logits.shape
        c, k = kept.shape[0], rule.top_k
        member = torch.zeros(n, c, dtype=torch.float64, device=logits.device)
        member[kept.t(), torch.arange(c, device=logits.device).expand(kept.shape[1], c)] = 1.0
        values, order = logits.sort(dim=1, descending=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=logits.device).expand(t, n))
        # Bit p of mask[t, c] is set when the expert at position p of token t's ranking is kept.
        mask = (torch.ldexp(torch.ones((), dtype=torch.float64, device=logits.device), rank.double()) @ member).long()
        ids: list[torch.Tensor] = []
        chosen: list[torch.Tensor] = []
        for _ in range(k):
            low = mask & -mask
            pos = torch.frexp(low.double()).exponent.long() - 1
            mask = mask ^ low
            ids.append(order.gather(1, pos))
            chosen.append(values.gather(1, pos))
        if rule.renormalize:
            # p_i / sum_{j in top-k} p_j = softmax over the chosen logits (the first is the largest).
            exps = [torch.exp(v - chosen[0]) for v in chosen]
            total = torch.stack(exps).sum(0)
            weights = [e / total for e in exps]
        else:
            # p_i = exp(l_i) / sum_{j in S} exp(l_j); float64 so no kept set's terms underflow.
            top = values[:, :1].double()
            denom = torch.exp(logits.double() - top) @ member
            weights = [(torch.exp(v.double() - top) / denom).float() for v in chosen]
        w = torch.stack(weights)
        if rule.scale != 1.0:
            w = w * rule.scale
        out_ids = torch.stack(ids)
        scale = values.abs().amax(1).clamp_min(1.0)
        tied = ((values[:, :-1] - values[:, 1:]) <= TIE_TOLERANCE * scale.unsqueeze(1)).any(1)
        # Float32 probabilities of experts ~87 nats below the best are denormal or zero: they tie.
        tied |= (values[:, 0] - values[:, -1]) > UNDERFLOW_SPREAD
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            w_tie, ids_tie = self._batched(rule, logits.index_select(0, rows), kept)
            w[:, rows] = w_tie
            out_ids[:, rows] = ids_tie
        return w, out_ids


# -- the per-chunk Gram data ----------------------------------------------------------------------
#: Up to this many experts the Gram matrices are stored whole, above it as their upper triangle.
FULL_GRAM_MAX_EXPERTS = 32


@dataclass
class GramChunk:
    """What scoring needs about one chunk of tokens ``[start, end)`` (float64 except the logits).

    ``gram`` is each token's Gram matrix ``G`` flattened (``[T, n * n]``, or its upper triangle
    ``[T, n (n + 1) / 2]`` for many experts), ``u = G a(full)`` ``[T, n]``, ``zz = a(full)^T u`` ``[T]``.
    """

    start: int
    end: int
    logits: torch.Tensor
    gram: torch.Tensor
    u: torch.Tensor
    zz: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        """The chunk's tensors by name."""
        return {"logits": self.logits, "gram": self.gram, "u": self.u, "zz": self.zz}

    def nbytes(self) -> int:
        """Bytes held by the chunk's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class _ChunkStore:
    """Chunks in memory up to a byte budget, the rest as safetensors files in ``spill_dir``."""

    def __init__(self, spill_dir: Path | None, budget: int, device: torch.device) -> None:
        self.spill_dir = spill_dir
        self.budget = budget
        self.device = device
        self.used = 0
        self.items: list[GramChunk | tuple[Path, int, int]] = []

    def add(self, chunk: GramChunk) -> None:
        size = chunk.nbytes()
        if self.used + size <= self.budget or self.spill_dir is None:
            self.items.append(chunk)
            self.used += size
            return
        path = self.spill_dir / f"gram_{len(self.items):05d}.safetensors"
        save_tensors(path, chunk.tensors())
        self.items.append((path, chunk.start, chunk.end))

    def __iter__(self) -> Iterator[GramChunk]:
        for item in self.items:
            if isinstance(item, GramChunk):
                yield item
                continue
            path, start, end = item
            data = {k: v.to(self.device) for k, v in load_tensors(path, what="search cache file").items()}
            yield GramChunk(start, end, **data)

    def clear(self) -> None:
        for item in self.items:
            if not isinstance(item, GramChunk):
                remove_path(item[0])
        self.items.clear()
        self.used = 0

    @property
    def spilled(self) -> int:
        return sum(not isinstance(i, GramChunk) for i in self.items)


@dataclass
class RoutingStats:
    """Full-model routing statistics of one layer on the calibration tokens."""

    counts: torch.Tensor  # [n] int64: routing slots taken by each expert
    reap_sum: torch.Tensor  # [n] float64: sum over routed tokens of w_j(x) * ||E_j(x)||
    tokens: int

    def reap_scores(self) -> torch.Tensor:
        """REAP score per expert: mean over the tokens routed to it of ``w_j(x) * ||E_j(x)||_2``."""
        return self.reap_sum / self.counts.clamp_min(1).double()


def all_subsets(n: int, r: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Every ``r``-subset of ``range(n)`` in lexicographic order, ``[C(n, r), r]``."""
    rows = list(itertools.combinations(range(n), r))
    return torch.tensor(rows, dtype=torch.long, device=device).view(len(rows), r)


# -- the scorer -------------------------------------------------------------------------------------
class LayerScorer:
    """Scores kept-expert sets of one MoE block on fixed input tokens from cached Gram matrices.

    Call :meth:`score_subsets` (enumeration: one pass computing only the expert outputs some
    ``r``-subset routes to, returning every subset's loss) or :meth:`prepare` (one dense pass) before
    :meth:`losses`. ``x`` is ``[N, L, d]`` or ``[T, d]``, in sequence order; a loss batch is
    ``tokens_per_batch`` consecutive tokens.
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
        spill_dir: Path | None = None,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.adapter = adapter
        self.block = block
        self.config = config
        self.x = x.reshape(-1, x.shape[-1])
        self.device = torch.device(device)
        self.n = adapter.block_num_experts(block)
        self.k = adapter.top_k(config)
        self.layout = TokenLayout(self.x.shape[0], tokens_per_batch, token_chunk)
        self.router = CandidateRouter(adapter, block, config)
        self.store = _ChunkStore(spill_dir, cache_bytes, self.device)
        self.stats: RoutingStats | None = None
        self.subset_size: int | None = None
        self._full_gram = self.n <= FULL_GRAM_MAX_EXPERTS
        iu = torch.triu_indices(self.n, self.n)
        lut = torch.empty(self.n, self.n, dtype=torch.long)
        lut[iu[0], iu[1]] = torch.arange(iu.shape[1])
        lut[iu[1], iu[0]] = torch.arange(iu.shape[1])
        self._triu = (iu[0].to(self.device), iu[1].to(self.device))
        self._lut = lut.view(-1).to(self.device)

    # -- passes ----------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self) -> None:
        """One dense pass: every expert on every token; afterwards any kept set can be scored."""
        self._pass(None)

    @torch.no_grad()
    def score_subsets(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every ``r``-subset's loss, from one pass that computes only the needed expert outputs.

        Returns ``(kept [C(n, r), r], losses [C(n, r)] float64)`` in lexicographic order. Afterwards
        :meth:`losses` scores any ``r``-subset (and only those).
        """
        kept = all_subsets(self.n, r, self.device)
        return kept, self._pass(kept)

    def _group_size(self, tokens: int, c: int) -> int:
        return max(1, min(c, SCORE_ELEMENTS // max(1, tokens * (self.k + 2))))

    def _pass(self, subsets: torch.Tensor | None) -> torch.Tensor | None:
        self.store.clear()
        n = self.n
        counts = torch.zeros(n, dtype=torch.long, device=self.device)
        reap = torch.zeros(n, dtype=torch.float64, device=self.device)
        acc = None
        if subsets is not None:
            acc = torch.zeros(subsets.shape[0], self.layout.num_batches, dtype=torch.float64, device=self.device)
        dtype = next(self.block.parameters()).dtype
        for start, end in self.layout.chunks():
            xs = self.x[start:end].to(self.device, dtype)
            t = xs.shape[0]
            logits = self.adapter.router_logits(self.block, xs).float()
            w_full, ids_full = self.adapter.route(self.block, logits, self.config)
            groups: list[tuple[int, int]] = []
            routed: list[tuple[torch.Tensor, torch.Tensor]] | None = None
            if subsets is None:
                outputs = self.adapter.expert_outputs(self.block, xs)
            else:
                # Route every subset first: only (token, expert) pairs some subset routes to are needed.
                needed = torch.zeros(t, n, dtype=torch.bool, device=self.device)
                needed.scatter_(1, ids_full, True)
                g = self._group_size(t, subsets.shape[0])
                groups = [(c0, min(c0 + g, subsets.shape[0])) for c0 in range(0, subsets.shape[0], g)]
                routed = []
                for c0, c1 in groups:
                    w, ids = self.router(logits, subsets[c0:c1])
                    for slot in ids:
                        needed.scatter_(1, slot, True)
                    if routed is not None and (len(routed) + 1) * w.numel() * 12 <= SCORE_ELEMENTS * 16:
                        routed.append((w, ids))
                    else:
                        routed = None
                outputs = self._needed_outputs(xs, needed)
            chunk = self._gram_chunk(start, end, logits, outputs, w_full, ids_full, counts, reap)
            del outputs
            if subsets is not None and acc is not None:
                for i, (c0, c1) in enumerate(groups):
                    w, ids = routed[i] if routed is not None else self.router(logits, subsets[c0:c1])
                    self.layout.batch_sums(start, end, self._err2(chunk, w, ids), acc[c0:c1])
            self.store.add(chunk)
        self.stats = RoutingStats(counts=counts.cpu(), reap_sum=reap.cpu(), tokens=self.layout.num_tokens)
        self.subset_size = None if subsets is None else int(subsets.shape[1])
        if self.store.spilled:
            log.info("search cache: %d of %d chunks spilled to %s", self.store.spilled, len(self.store.items), self.store.spill_dir)
        return None if acc is None else acc.clamp_min_(0).sqrt_().sum(1).cpu()

    def _needed_outputs(self, xs: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
        """Expert outputs ``[T, n, d]`` on the (token, expert) pairs marked in ``needed``, zeros elsewhere.

        Stored expert-major (a ``[n, T, d]`` buffer, returned as a permuted view) so each expert's
        rows are written with one contiguous row copy.
        """
        t, d = xs.shape
        out = torch.empty(self.n, t, d, dtype=xs.dtype, device=xs.device)
        per_expert = needed.sum(0).tolist()
        for j in range(self.n):
            if per_expert[j] == t:
                out[j] = self.adapter.expert_outputs(self.block, xs, [j])[:, 0]
                continue
            out[j].index_fill_(0, (~needed[:, j]).nonzero().squeeze(1), 0.0)
            if per_expert[j]:
                tok = needed[:, j].nonzero().squeeze(1)
                out[j].index_copy_(0, tok, self.adapter.expert_outputs(self.block, xs.index_select(0, tok), [j])[:, 0])
        return out.permute(1, 0, 2)

    def _gram_chunk(
        self,
        start: int,
        end: int,
        logits: torch.Tensor,
        outputs: torch.Tensor,
        w_full: torch.Tensor,
        ids_full: torch.Tensor,
        counts: torch.Tensor,
        reap: torch.Tensor,
    ) -> GramChunk:
        t, n, d = outputs.shape
        gram = torch.empty(t, n, n, dtype=torch.float64, device=outputs.device)
        # Small token blocks keep the float64 copy in cache on the CPU; one block on a GPU.
        step = max(1, (GRAM_BLOCK_ELEMENTS if outputs.device.type == "cpu" else 1 << 25) // max(1, n * d))
        for s in range(0, t, step):
            e = outputs[s : s + step].double()
            torch.bmm(e, e.transpose(1, 2), out=gram[s : s + step])
        a_full = torch.zeros(t, n, dtype=torch.float64, device=outputs.device)
        a_full.scatter_add_(1, ids_full, w_full.double())
        u = torch.bmm(gram, a_full.unsqueeze(2)).squeeze(2)
        zz = (u * a_full).sum(1)
        norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        counts += torch.bincount(ids_full.reshape(-1), minlength=n)
        reap.scatter_add_(0, ids_full.reshape(-1), (w_full.double() * norms.gather(1, ids_full)).reshape(-1))
        flat = gram.view(t, n * n) if self._full_gram else gram[:, self._triu[0], self._triu[1]]
        return GramChunk(start, end, logits, flat, u, zz)

    # -- scoring ---------------------------------------------------------------------------------
    def _pair(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Column of ``G_ij`` in a chunk's flattened Gram matrices."""
        flat = i * self.n + j
        return flat if self._full_gram else self._lut[flat]

    def _err2(self, chunk: GramChunk, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Squared output error ``[C, T]`` of candidates routed as ``(w, ids)`` ``[k, T, C]``.

        ``||e||^2 = a^T G a - 2 a(S)^T u + a(S)^T G a(S)``, one ``[T, C]`` operation per routing slot
        and pair of slots (kernels over tiny inner dimensions are slow).
        """
        k = ids.shape[0]
        w64 = w.double()
        err = chunk.zz.unsqueeze(1).expand(ids.shape[1], ids.shape[2]).clone()
        for a in range(k):
            g_aa = chunk.gram.gather(1, self._pair(ids[a], ids[a]))
            u_a = chunk.u.gather(1, ids[a])
            err += w64[a] * (w64[a] * g_aa - 2.0 * u_a)
            for b in range(a + 1, k):
                err += 2.0 * w64[a] * w64[b] * chunk.gram.gather(1, self._pair(ids[a], ids[b]))
        return err.t().contiguous()

    @torch.no_grad()
    def losses(self, kept: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Loss of each kept set (rows of ascending expert ids, all of one size) -> ``[C]`` float64 (CPU)."""
        if self.stats is None:
            raise RuntimeError("call prepare() or score_subsets() before losses()")
        kept_t = torch.as_tensor(kept, dtype=torch.long).to(self.device)
        if kept_t.dim() != 2 or kept_t.shape[1] < self.k:
            raise ValueError(f"kept sets must be a [C, m] table with m >= top_k={self.k}")
        if self.subset_size is not None and kept_t.shape[1] != self.subset_size:
            raise ValueError(f"this scorer was prepared for {self.subset_size}-subsets only")
        c = kept_t.shape[0]
        acc = torch.zeros(c, self.layout.num_batches, dtype=torch.float64, device=self.device)
        for chunk in self.store:
            g = self._group_size(chunk.end - chunk.start, c)
            for c0 in range(0, c, g):
                w, ids = self.router(chunk.logits, kept_t[c0 : c0 + g])
                self.layout.batch_sums(chunk.start, chunk.end, self._err2(chunk, w, ids), acc[c0 : c0 + g])
        return acc.clamp_min_(0).sqrt_().sum(1).cpu()

    def close(self) -> None:
        """Drop cached chunks (and their spill files)."""
        self.store.clear()
