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

import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.io import load_tensors, remove_path, save_tensors
from pipeline.models.base import MoEAdapter

log = logging.getLogger(__name__)

#: Elements of one ``[tokens, candidates, terms]`` scoring intermediate (bounds scoring memory).
SCORE_ELEMENTS = 1 << 22
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
class CandidateRouter:
    """Routing weights and ids of many kept sets at once, exactly as ``adapter.route`` computes them.

    The adapter's own :meth:`MoEAdapter.route` is called per candidate when the family overrides it
    or has a per-expert selection bias; otherwise the rule of the pruned config is applied to every
    candidate's logits in one batched call (rules act row by row, so this is the same computation).
    """

    def __init__(self, adapter: MoEAdapter, block: nn.Module, config: Any) -> None:
        self.adapter = adapter
        self.block = block
        self.config = config
        self.n = adapter.block_num_experts(block)
        self._rules: dict[int, Any] = {}
        overridden = type(adapter).route is not MoEAdapter.route
        self.batched = not overridden and adapter.choice_bias(block) is None

    def _rule(self, m: int) -> Any:
        if m not in self._rules:
            cfg = self.config if m == self.n else self.adapter.pruned_config(self.config, m)
            self._rules[m] = self.adapter.routing_rule(cfg)
        return self._rules[m]

    def __call__(self, logits: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits [T, n]``, ``kept [C, m]`` (ascending ids) -> weights ``[T, C, k]`` float32, ids ``[T, C, k]``."""
        t = logits.shape[0]
        c, m = kept.shape
        if not self.batched:
            outs = [self.adapter.route(self.block, logits, self.config, row.tolist()) for row in kept]
            weights = torch.stack([w.float() for w, _ in outs], 1)
            ids = torch.stack([i.long() for _, i in outs], 1)
            return weights, ids
        sub = logits.index_select(1, kept.reshape(-1)).view(t * c, m)
        weights, local = self._rule(m)(sub)
        k = weights.shape[-1]
        offsets = torch.arange(c, device=kept.device).mul_(m).view(1, c, 1)
        ids = kept.reshape(-1)[local.view(t, c, k) + offsets]
        return weights.view(t, c, k).float(), ids


# -- the per-chunk Gram data ----------------------------------------------------------------------
@dataclass
class GramChunk:
    """What scoring needs about one chunk of tokens ``[start, end)``.

    ``table`` is ``[T, P + n]`` float64: the ``P = n (n + 1) / 2`` upper-triangle entries of each
    token's Gram matrix followed by ``u = G a(full)``; ``zz`` is ``a(full)^T G a(full)`` ``[T]``.
    """

    start: int
    end: int
    logits: torch.Tensor
    table: torch.Tensor
    zz: torch.Tensor

    def nbytes(self) -> int:
        """Bytes held by the chunk's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.logits, self.table, self.zz))


class _ChunkStore:
    """Chunks in memory up to a byte budget, the rest as safetensors files in ``spill_dir``."""

    def __init__(self, spill_dir: Path | None, budget: int, device: torch.device) -> None:
        self.spill_dir = spill_dir
        self.budget = budget
        self.device = device
        self.used = 0
        self.items: list[GramChunk | Path] = []

    def add(self, chunk: GramChunk) -> None:
        size = chunk.nbytes()
        if self.used + size <= self.budget or self.spill_dir is None:
            self.items.append(chunk)
            self.used += size
            return
        path = self.spill_dir / f"gram_{len(self.items):05d}.safetensors"
        save_tensors(
            path,
            {"logits": chunk.logits, "table": chunk.table, "zz": chunk.zz},
            metadata={"start": str(chunk.start), "end": str(chunk.end)},
        )
        self.items.append(path)

    def __iter__(self) -> Iterator[GramChunk]:
        for item in self.items:
            if isinstance(item, GramChunk):
                yield item
                continue
            data = load_tensors(item, what="search cache file")
            from safetensors import safe_open

            with safe_open(str(item), framework="pt") as fh:
                meta = fh.metadata()
            yield GramChunk(
                int(meta["start"]),
                int(meta["end"]),
                data["logits"].to(self.device),
                data["table"].to(self.device),
                data["zz"].to(self.device),
            )

    def clear(self) -> None:
        for item in self.items:
            if isinstance(item, Path):
                remove_path(item)
        self.items.clear()
        self.used = 0

    @property
    def spilled(self) -> int:
        return sum(isinstance(i, Path) for i in self.items)


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
        iu = torch.triu_indices(self.n, self.n)
        lut = torch.full((self.n, self.n), -1, dtype=torch.long)
        lut[iu[0], iu[1]] = torch.arange(iu.shape[1])
        lut[iu[1], iu[0]] = torch.arange(iu.shape[1])
        self._tri = (iu[0].to(self.device), iu[1].to(self.device))
        self._lut = lut.view(-1).to(self.device)
        self._p = iu.shape[1]
        ka, kb = torch.triu_indices(self.k, self.k)
        self._ka, self._kb = ka.to(self.device), kb.to(self.device)
        self._fac = torch.where(ka == kb, 1.0, 2.0).to(torch.float64).to(self.device)

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
        terms = self._ka.numel() + self.k
        return max(1, min(c, SCORE_ELEMENTS // max(1, tokens * terms)))

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
            routed: list[tuple[torch.Tensor, torch.Tensor]] | None = None
            if subsets is None:
                outputs = self.adapter.expert_outputs(self.block, xs)
            else:
                needed = torch.zeros(t, n, dtype=torch.bool, device=self.device)
                needed.scatter_(1, ids_full, True)
                routed = []
                keep_routing = True
                size = 0
                g = self._group_size(t, subsets.shape[0])
                for c0 in range(0, subsets.shape[0], g):
                    w, ids = self.router(logits, subsets[c0 : c0 + g])
                    needed.scatter_(1, ids.view(t, -1), True)
                    size += w.numel() * 12
                    if keep_routing and size <= SCORE_ELEMENTS * 16:
                        routed.append((w, ids))
                    else:
                        keep_routing = False
                        routed = None
                outputs = self._needed_outputs(xs, needed)
            chunk = self._gram_chunk(start, end, logits, outputs, w_full, ids_full, counts, reap)
            del outputs
            if subsets is not None and acc is not None:
                g = self._group_size(t, subsets.shape[0])
                for i, c0 in enumerate(range(0, subsets.shape[0], g)):
                    w, ids = routed[i] if routed is not None else self.router(logits, subsets[c0 : c0 + g])
                    self.layout.batch_sums(start, end, self._err2(chunk, w, ids), acc[c0 : c0 + g])
            self.store.add(chunk)
        self.stats = RoutingStats(counts=counts.cpu(), reap_sum=reap.cpu(), tokens=self.layout.num_tokens)
        self.subset_size = None if subsets is None else int(subsets.shape[1])
        if self.store.spilled:
            log.info("search cache: %d of %d chunks spilled to %s", self.store.spilled, len(self.store.items), self.store.spill_dir)
        return None if acc is None else acc.clamp_min_(0).sqrt_().sum(1).cpu()

    def _needed_outputs(self, xs: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
        """Expert outputs ``[T, n, d]`` on the (token, expert) pairs marked in ``needed``, zeros elsewhere."""
        t, d = xs.shape
        out = torch.zeros(t, self.n, d, dtype=xs.dtype, device=xs.device)
        per_expert = needed.sum(0).tolist()
        for j in range(self.n):
            if per_expert[j] == 0:
                continue
            if per_expert[j] == t:
                out[:, j] = self.adapter.expert_outputs(self.block, xs, [j])[:, 0]
                continue
            tok = needed[:, j].nonzero().squeeze(1)
            out[tok, j] = self.adapter.expert_outputs(self.block, xs.index_select(0, tok), [j])[:, 0]
        return out

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
        step = max(1, (1 << 25) // max(1, n * d))
        for s in range(0, t, step):
            e = outputs[s : s + step].double()
            torch.bmm(e, e.transpose(1, 2), out=gram[s : s + step])
        a_full = torch.zeros(t, n, dtype=torch.float64, device=outputs.device)
        a_full.scatter_add_(1, ids_full, w_full.double())
        u = torch.bmm(gram, a_full.unsqueeze(2)).squeeze(2)
        zz = (u * a_full).sum(1)
        table = torch.cat([gram[:, self._tri[0], self._tri[1]], u], 1)
        norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        counts += torch.bincount(ids_full.reshape(-1), minlength=n)
        reap.scatter_add_(0, ids_full.reshape(-1), (w_full.double() * norms.gather(1, ids_full)).reshape(-1))
        return GramChunk(start, end, logits, table, zz)

    # -- scoring ---------------------------------------------------------------------------------
    def _err2(self, chunk: GramChunk, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Squared output error ``[C, T]`` of candidates routed as ``(w, ids) [T, C, k]``."""
        t, c, k = ids.shape
        n = self.n
        pairs = self._lut[ids[..., self._ka] * n + ids[..., self._kb]]
        index = torch.cat([pairs, ids + self._p], -1).view(t, -1)
        values = chunk.table.gather(1, index).view(t, c, -1)
        w64 = w.double()
        coef = torch.cat([w64[..., self._ka] * w64[..., self._kb] * self._fac, w64.mul(-2.0)], -1)
        err2 = values.mul_(coef).sum(-1).add_(chunk.zz.unsqueeze(1))
        return err2.t().contiguous()

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
            t = chunk.end - chunk.start
            g = self._group_size(t, c)
            for c0 in range(0, c, g):
                w, ids = self.router(chunk.logits, kept_t[c0 : c0 + g])
                self.layout.batch_sums(chunk.start, chunk.end, self._err2(chunk, w, ids), acc[c0 : c0 + g])
        return acc.clamp_min_(0).sqrt_().sum(1).cpu()

    def close(self) -> None:
        """Drop cached chunks (and their spill files)."""
        self.store.clear()


def binomial(n: int, r: int) -> int:
    """``C(n, r)``."""
    return math.comb(n, r)
