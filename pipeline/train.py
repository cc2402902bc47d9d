"""The embedded model: a byte-level BPE tokenizer and a small MoE trained on the corpus, on CPU.

``train_embedded`` trains the tokenizer on the corpus train split, builds a small MoE of the chosen
architecture from transformers' own config classes, trains it on packed sequences mixing every
domain (AdamW, warmup + cosine decay, the router load-balancing loss), saves a standard checkpoint
(safetensors + fast tokenizer), and evaluates it: per-domain validation perplexity against an
add-one unigram baseline on the same tokens, and per-domain expert-routing histograms ("do experts
specialise by domain?"). Everything is seeded; the same inputs give the same weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import EmbeddedModelParams, TrainParams
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
#: Final learning rate of the cosine schedule, as a fraction of the peak.
MIN_LR_RATIO = 0.1
GRAD_CLIP = 1.0

StepCallback = Callable[[int, dict[str, float]], None]


# -- tokenizer -----------------------------------------------------------------------------------
def train_tokenizer(texts: Sequence[str], vocab_size: int, model_max_length: int) -> Any:
    """A byte-level BPE tokenizer with ``vocab_size`` entries (``<|endoftext|>`` included), trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of every text, each followed by the EOS token."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [row + [eos] for row in ids]


def pack(sequences: Sequence[Sequence[int]], seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Concatenate ``sequences`` and cut blocks of ``seq_len`` tokens ``[n, seq_len]`` (the tail is dropped).

    With ``max_tokens``, at most ``ceil(max_tokens / seq_len)`` blocks. A stream shorter than one
    block gives one block of the whole stream.
    """
    stream = torch.tensor([t for seq in sequences for t in seq], dtype=torch.long)
    if stream.numel() < 2:
        raise PipelineError("corpus: too few tokens to form a sequence")
    if stream.numel() < seq_len:
        return stream.unsqueeze(0)
    n = stream.numel() // seq_len
    if max_tokens is not None:
        n = min(n, max(1, math.ceil(max_tokens / seq_len)))
    return stream[: n * seq_len].view(n, seq_len)


# -- model ---------------------------------------------------------------------------------------
def _common(shape: EmbeddedModelParams, eos_id: int, aux_coef: float) -> dict[str, Any]:
    return {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "num_experts_per_tok": shape.top_k,
        "router_aux_loss_coef": aux_coef,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
    }


def _mixtral(s: EmbeddedModelParams, c: dict[str, Any]) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(**c, intermediate_size=s.intermediate_size, num_local_experts=s.num_experts)


def _qwen3_moe(s: EmbeddedModelParams, c: dict[str, Any]) -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **c,
        intermediate_size=s.intermediate_size,
        moe_intermediate_size=s.intermediate_size,
        num_experts=s.num_experts,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        head_dim=s.hidden_size // s.num_heads,
    )


def _olmoe(s: EmbeddedModelParams, c: dict[str, Any]) -> Any:
    from transformers import OlmoeConfig

    return OlmoeConfig(**c, intermediate_size=s.intermediate_size, num_experts=s.num_experts, norm_topk_prob=False)


def _qwen2_moe(s: EmbeddedModelParams, c: dict[str, Any]) -> Any:
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **c,
        intermediate_size=s.intermediate_size,
        moe_intermediate_size=s.intermediate_size,
        shared_expert_intermediate_size=s.intermediate_size,
        num_experts=s.num_experts,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def _deepseek_v3(s: EmbeddedModelParams, c: dict[str, Any]) -> Any:
    from transformers import DeepseekV3Config

    head = s.hidden_size // s.num_heads
    c = {**c, "num_key_value_heads": s.num_heads}  # multi-head latent attention: no grouped KV heads
    return DeepseekV3Config(
        **c,
        intermediate_size=s.intermediate_size,
        moe_intermediate_size=s.intermediate_size,
        n_routed_experts=s.num_experts,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1 if s.num_layers > 1 else 0,
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
        kv_lora_rank=max(8, s.hidden_size // 2),
        q_lora_rank=None,
        qk_nope_head_dim=head,
        qk_rope_head_dim=max(2, head // 2),
        v_head_dim=head,
    )


#: ``model.embedded.architecture`` -> builder of a transformers config of equivalent size: the same
#: width, depth, heads, expert count, top-k and per-expert hidden size. Qwen2-MoE adds its shared
#: expert, DeepSeek-V3 a shared expert and a dense first layer (as the real models have).
CONFIG_BUILDERS: dict[str, Callable[[EmbeddedModelParams, dict[str, Any]], Any]] = {
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "qwen2_moe": _qwen2_moe,
    "deepseek_v3": _deepseek_v3,
}


def build_config(shape: EmbeddedModelParams, eos_id: int, router_aux_loss_coef: float) -> Any:
    """The transformers config of the embedded model."""
    builder = CONFIG_BUILDERS.get(shape.architecture)
    if builder is None:
        raise PipelineError(
            f"model.embedded.architecture: {shape.architecture!r} is not one of {', '.join(CONFIG_BUILDERS)}"
        )
    return builder(shape, _common(shape, eos_id, router_aux_loss_coef))


def build_model(config: Any, seed: int) -> nn.Module:
    """A freshly initialised causal LM for ``config`` (float32), seeded."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


# -- training ------------------------------------------------------------------------------------
def lr_factor(step: int, warmup: int, total: int, min_ratio: float = MIN_LR_RATIO) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def batches(blocks: torch.Tensor, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` batches of ``batch_size`` blocks: seeded permutations, epoch after epoch."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(blocks.shape[0], generator=gen)
    pos = 0
    for _ in range(steps):
        take: list[torch.Tensor] = []
        have = 0
        while have < batch_size:
            if pos == order.numel():
                order, pos = torch.randperm(blocks.shape[0], generator=gen), 0
            n = min(batch_size - have, order.numel() - pos)
            take.append(order[pos : pos + n])
            pos += n
            have += n
        yield blocks[torch.cat(take)]


def layer_balance_loss(router_logits: Sequence[torch.Tensor | None], top_k: int) -> torch.Tensor | None:
    """The Switch load-balancing loss of every MoE layer, averaged over layers.

    Per layer: ``n * sum_i f_i * P_i`` with ``f_i`` the share of the layer's top-k slots routed to
    expert ``i`` and ``P_i`` its mean router probability (1.0 when balanced). transformers' own loss
    pools the tokens of all layers first, so one layer's idle expert can hide behind another
    layer's busy one; here each layer must balance on its own.
    """
    losses = []
    for logits in router_logits:
        if logits is None:
            continue
        logits = logits.reshape(-1, logits.shape[-1]).float()
        n = logits.shape[-1]
        probs = torch.softmax(logits, dim=-1)
        chosen = torch.topk(probs, min(top_k, n), dim=-1).indices
        share = torch.bincount(chosen.flatten(), minlength=n).to(probs.dtype) / chosen.numel()
        losses.append(n * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean() if losses else None


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic torch algorithms inside the block (restored after)."""
    before = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@dataclass
class TrainStats:
    """What training did."""

    steps: int
    tokens: int
    seconds: float
    final_loss: float
    losses: list[dict[str, float]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Training throughput."""
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def train_model(
    model: nn.Module,
    blocks: torch.Tensor,
    settings: TrainParams,
    device: torch.device,
    on_step: StepCallback | None = None,
) -> TrainStats:
    """Train ``model`` in place on ``blocks`` ``[n, seq_len]`` for ``settings.steps`` steps."""
    from tqdm.auto import tqdm

    model.to(device).train()
    config = model.config
    opt = _optimizer(model, settings.lr, settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, settings.warmup_steps, settings.steps))
    coef = settings.router_aux_loss_coef
    model_coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    losses: list[dict[str, float]] = []
    tokens = 0
    started = time.perf_counter()
    bar = tqdm(total=settings.steps, desc="train", unit="step", disable=None)
    with deterministic():
        for step, batch in enumerate(batches(blocks, settings.batch_size, settings.steps, settings.seed)):
            batch = batch.to(device)
            out = model(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False)
            aux = layer_balance_loss(out.router_logits or (), config.num_experts_per_tok)
            # the model's loss already holds its own coef * its pooled aux loss when it computes one
            lm_loss = out.loss if out.aux_loss is None else out.loss - model_coef * out.aux_loss
            loss = lm_loss if aux is None else lm_loss + coef * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            tokens += batch.numel()
            record = {
                "step": step,
                "loss": float(lm_loss.detach()),
                "aux_loss": float(aux.detach()) if aux is not None else 0.0,
                "lr": lr,
            }
            losses.append(record)
            if on_step is not None:
                on_step(step, {"train_loss": record["loss"], "router_aux_loss": record["aux_loss"], "lr": lr})
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if bar.disable and (step + 1) % max(1, settings.steps // 10) == 0:
                rate = tokens / (time.perf_counter() - started)
                log.info(
                    "step %d/%d: loss %.3f, lr %.2e, %.0f tokens/s", step + 1, settings.steps, record["loss"], lr, rate
                )
    bar.close()
    seconds = time.perf_counter() - started
    model.eval()
    tail = losses[-max(1, min(10, len(losses))) :]
    return TrainStats(settings.steps, tokens, seconds, sum(r["loss"] for r in tail) / len(tail), losses)


# -- evaluation ----------------------------------------------------------------------------------
class UnigramModel:
    """Add-one smoothed unigram distribution over the vocabulary, fitted on training tokens."""

    def __init__(self, tokens: torch.Tensor, vocab_size: int) -> None:
        counts = torch.bincount(tokens.flatten(), minlength=vocab_size)[:vocab_size].double()
        self.log_probs = torch.log((counts + 1.0) / (counts.sum() + vocab_size))

    def nll(self, targets: torch.Tensor) -> float:
        """Summed negative log-likelihood of ``targets``."""
        return float(-self.log_probs[targets.flatten()].sum())


class RoutingRecorder:
    """Counts each MoE layer's top-k expert choices, through the model adapter's router hook."""

    def __init__(self, model: nn.Module) -> None:
        from pipeline.models import get_adapter

        adapter = get_adapter(model.config)
        self.counts: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        for i, layer in enumerate(adapter.decoder_layers(model)):
            block = adapter.moe_block(layer)
            if block is not None:
                n = adapter.block_num_experts(block)
                self._handles.append(adapter.add_router_transform(block, self._counter(i, n)))

    def _counter(self, layer: int, n: int) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        def count(weights: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            counts = torch.bincount(idx.flatten().cpu(), minlength=n + 1)[:n].double()
            self.counts[layer] = self.counts.get(layer, torch.zeros(n, dtype=torch.float64)) + counts
            return weights, idx

        return count

    def take(self) -> dict[int, list[float]]:
        """Counts per layer since the last call, then reset."""
        out = {layer: c.tolist() for layer, c in sorted(self.counts.items())}
        self.counts = {}
        return out

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def evaluate_domains(
    model: nn.Module,
    blocks_by_domain: dict[str, torch.Tensor],
    unigram: UnigramModel,
    device: torch.device,
    batch_size: int,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[int, list[float]]]]:
    """Per domain: model and unigram perplexity on the same predicted tokens; router choice counts."""
    model.eval()
    recorder = RoutingRecorder(model)
    results: dict[str, dict[str, float]] = {}
    routing: dict[str, dict[int, list[float]]] = {}
    try:
        for domain, blocks in blocks_by_domain.items():
            nll = base = 0.0
            count = 0
            for i in range(0, blocks.shape[0], batch_size):
                batch = blocks[i : i + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits.float()
                targets = batch[:, 1:]
                nll += float(
                    nn.functional.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                    )
                )
                base += unigram.nll(targets.cpu())
                count += targets.numel()
            results[domain] = {
                "perplexity": math.exp(nll / count),
                "unigram_perplexity": math.exp(base / count),
                "tokens": float(count),
            }
            routing[domain] = recorder.take()
    finally:
        recorder.remove()
    return results, routing


def routing_records(routing: dict[str, dict[int, list[float]]]) -> list[dict[str, Any]]:
    """Flat rows ``{domain, layer, expert, count, fraction}`` (fraction of the layer's top-k choices)."""
    rows = []
    for domain, layers in routing.items():
        for layer, counts in layers.items():
            total = sum(counts) or 1.0
            for expert, c in enumerate(counts):
                rows.append(
                    {"domain": domain, "layer": layer, "expert": expert, "count": int(c), "fraction": c / total}
                )
    return rows


def routing_divergence(routing: dict[str, dict[int, list[float]]]) -> dict[int, float]:
    """Per layer, the Jensen-Shannon divergence (bits) between the domains' expert-choice distributions.

    0 means every domain uses the experts alike; log2(number of domains) is the maximum.
    """

    def entropy(p: torch.Tensor) -> float:
        p = p[p > 0]
        return float(-(p * p.log2()).sum())

    layers = sorted({layer for per in routing.values() for layer in per})
    out: dict[int, float] = {}
    for layer in layers:
        dists = []
        for per in routing.values():
            if layer in per:
                c = torch.tensor(per[layer], dtype=torch.float64)
                if c.sum() > 0:
                    dists.append(c / c.sum())
        if len(dists) >= 2:
            mean = torch.stack(dists).mean(0)
            out[layer] = entropy(mean) - sum(entropy(d) for d in dists) / len(dists)
    return out


def routing_balance(routing: dict[str, dict[int, list[float]]]) -> dict[int, dict[str, float]]:
    """Per layer, over every domain's held-out tokens pooled: the least and most used expert's share of
    routed slots relative to the uniform share 1/n (``min_share``, ``max_share``; 1.0 = uniform) and the
    routing entropy in bits with its maximum log2(n) (``entropy``, ``max_entropy``).

    An expert with ``min_share`` below 0.5 gets less than half of its uniform share: pruning it is
    nearly free, whatever the search does.
    """
    layers = sorted({layer for per in routing.values() for layer in per})
    out: dict[int, dict[str, float]] = {}
    for layer in layers:
        counts = [torch.tensor(per[layer], dtype=torch.float64) for per in routing.values() if layer in per]
        total = torch.stack(counts).sum(0)
        if total.sum() <= 0:
            continue
        share = total / total.sum()
        n = share.numel()
        nz = share[share > 0]
        out[layer] = {
            "min_share": float(share.min() * n),
            "max_share": float(share.max() * n),
            "entropy": float(-(nz * nz.log2()).sum()),
            "max_entropy": math.log2(n),
        }
    return out


# -- plots ---------------------------------------------------------------------------------------
def plot_routing(routing: dict[str, dict[int, list[float]]], path: Path, title_extra: str = "") -> None:
    """Grouped bars per layer: share of top-k choices per expert, one colour per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({layer for per in routing.values() for layer in per})
    domains = list(routing)
    cols = min(2, max(1, len(layers)))
    rows = max(1, math.ceil(len(layers) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.5 * rows), squeeze=False)
    divergence = routing_divergence(routing)
    balance = routing_balance(routing)
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers, strict=False):
        n = max(len(per.get(layer, [])) for per in routing.values())
        width = 0.8 / max(1, len(domains))
        for j, domain in enumerate(domains):
            counts = routing[domain].get(layer, [0.0] * n)
            total = sum(counts) or 1.0
            xs = [e - 0.4 + width * (j + 0.5) for e in range(n)]
            ax.bar(xs, [c / total for c in counts], width=width, label=domain)
        ax.axhline(1.0 / n, color="grey", linestyle="--", linewidth=0.8, label="uniform (1/n)")
        jsd, bal = divergence.get(layer), balance.get(layer)
        title = f"layer {layer}" + (f": JSD between domains {jsd:.3f} bits" if jsd is not None else "")
        if bal is not None:
            title += (
                f"\nshare of uniform min {bal['min_share']:.2f} / max {bal['max_share']:.2f}, "
                f"entropy {bal['entropy']:.2f} of {bal['max_entropy']:.2f} bits"
            )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("share of top-k choices")
        ax.set_xticks(range(n))
    if layers:
        axes.flat[0].legend(fontsize=8, title="domain")
    fig.suptitle("Do experts specialise by domain? Router choices on validation tokens" + title_extra)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_perplexity(results: dict[str, dict[str, float]], path: Path) -> None:
    """Per-domain validation perplexity of the model next to the unigram baseline (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(results)
    xs = range(len(domains))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([x - 0.2 for x in xs], [results[d]["perplexity"] for d in domains], width=0.4, label="model")
    ax.bar(
        [x + 0.2 for x in xs], [results[d]["unigram_perplexity"] for d in domains], width=0.4, label="unigram baseline"
    )
    ax.set_yscale("log")
    ax.set_xticks(list(xs), domains)
    ax.set_xlabel("domain")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title("Embedded model vs add-one unigram, per domain")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss(losses: list[dict[str, float]], path: Path) -> None:
    """Training loss per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Embedded model: training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the whole embedded-model run ----------------------------------------------------------------
@dataclass
class EmbeddedResult:
    """What ``train_embedded`` produced."""

    checkpoint: Path
    metrics: dict[str, float]
    evaluation: dict[str, dict[str, float]]
    routing: dict[str, dict[int, list[float]]]
    plots: list[Path]


def load_splits(corpus_dir: str | os.PathLike[str]) -> Any:
    """The corpus stage's DatasetDict (train and validation are required)."""
    import datasets

    path = Path(corpus_dir)
    if not (path / "dataset_dict.json").is_file():
        raise PipelineError(f"corpus data {path} does not exist: run the corpus stage first (dvc repro corpus)")
    dd = datasets.load_from_disk(str(path))
    for split in ("train", "validation"):
        if split not in dd or dd[split].num_rows == 0:
            raise PipelineError(f"corpus data {path} has no {split} documents")
    return dd


def train_embedded(
    corpus_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    shape: EmbeddedModelParams,
    device: torch.device,
    on_step: StepCallback | None = None,
) -> EmbeddedResult:
    """Train tokenizer and model on the corpus; write ``checkpoint/`` and ``plots/`` into ``out_dir``."""
    from pipeline.io import write_json

    settings = shape.train
    if settings.seq_len > shape.max_position_embeddings:
        raise PipelineError(
            f"model.embedded.train.seq_len: {settings.seq_len} exceeds "
            f"max_position_embeddings={shape.max_position_embeddings}"
        )
    out = Path(out_dir)
    ckpt, plots = out / "checkpoint", out / "plots"
    dd = load_splits(corpus_dir)
    train_texts = dd["train"]["text"]
    started = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, shape.vocab_size, shape.max_position_embeddings)
    if len(tokenizer) > shape.vocab_size:
        raise PipelineError(f"model.embedded.vocab_size: tokenizer has {len(tokenizer)} entries")
    train_blocks = pack(encode(tokenizer, train_texts), settings.seq_len)
    tokenize_s = time.perf_counter() - started
    log.info(
        "tokenizer: %d entries; train: %d blocks of %d tokens", len(tokenizer), train_blocks.shape[0], settings.seq_len
    )

    config = build_config(shape, tokenizer.eos_token_id, settings.router_aux_loss_coef)
    model = build_model(config, settings.seed)
    n_params = count_parameters(model)
    log.info("model: %s, %.2fM parameters", config.model_type, n_params / 1e6)
    stats = train_model(model, train_blocks, settings, device, on_step)

    model.to("cpu")
    model.config.use_cache = True
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)

    val = dd["validation"]
    val_blocks = {}
    for domain in sorted(set(val["domain"]), key=list(dict.fromkeys(val["domain"])).index):
        texts = [t for t, d in zip(val["text"], val["domain"], strict=True) if d == domain]
        val_blocks[domain] = pack(encode(tokenizer, texts), settings.seq_len, settings.eval_tokens_per_domain)
    unigram = UnigramModel(train_blocks, len(tokenizer))
    evaluation, routing = evaluate_domains(model.to(device), val_blocks, unigram, device, settings.batch_size)
    model.to("cpu")

    plots.mkdir(parents=True, exist_ok=True)
    write_json(plots / "train_loss.json", [{"step": r["step"], "loss": r["loss"], "lr": r["lr"]} for r in stats.losses])
    write_json(
        plots / "perplexity.json",
        [{"domain": d, "model": r["perplexity"], "unigram": r["unigram_perplexity"]} for d, r in evaluation.items()],
    )
    write_json(plots / "routing.json", routing_records(routing))
    plot_routing(routing, plots / "routing.png", f" ({config.model_type})")
    plot_perplexity(evaluation, plots / "perplexity.png")
    plot_loss(stats.losses, plots / "train_loss.png")

    metrics: dict[str, float] = {
        "parameters": float(n_params),
        "train_tokens": float(stats.tokens),
        "train_seconds": stats.seconds,
        "tokens_per_s": stats.tokens_per_s,
        "tokenize_seconds": tokenize_s,
        "final_train_loss": stats.final_loss,
        "vocab_size": float(len(tokenizer)),
    }
    total_nll = total_base = total_tokens = 0.0
    for domain, r in evaluation.items():
        metrics[f"val_ppl.{domain}"] = r["perplexity"]
        metrics[f"unigram_ppl.{domain}"] = r["unigram_perplexity"]
        total_nll += math.log(r["perplexity"]) * r["tokens"]
        total_base += math.log(r["unigram_perplexity"]) * r["tokens"]
        total_tokens += r["tokens"]
    metrics["val_ppl"] = math.exp(total_nll / total_tokens)
    metrics["unigram_ppl"] = math.exp(total_base / total_tokens)
    divergence = routing_divergence(routing)
    for layer, jsd in divergence.items():
        metrics[f"routing_jsd.layer{layer}"] = jsd
    if divergence:
        metrics["routing_jsd"] = sum(divergence.values()) / len(divergence)
    balance = routing_balance(routing)
    for layer, bal in balance.items():
        for key in ("min_share", "max_share", "entropy"):
            metrics[f"routing_{key}.layer{layer}"] = bal[key]
    if balance:
        metrics["routing_min_share"] = min(b["min_share"] for b in balance.values())
        metrics["routing_max_share"] = max(b["max_share"] for b in balance.values())
        starved = {layer: round(b["min_share"], 3) for layer, b in balance.items() if b["min_share"] < 0.5}
        if starved:
            log.warning(
                "routing: in layers %s the least used expert gets under half of the uniform share of routed "
                "slots (share of uniform %s): pruning it costs little whatever the search does "
                "(raise model.embedded.train.router_aux_loss_coef or steps)",
                sorted(starved),
                starved,
            )
    return EmbeddedResult(
        checkpoint=ckpt,
        metrics=metrics,
        evaluation=evaluation,
        routing=routing,
        plots=sorted(plots.iterdir()),
    )


def embedded_manifest(checkpoint: Path, final_path: str) -> Any:
    """The manifest of the embedded checkpoint written at ``checkpoint``, recorded at ``final_path``.

    The fingerprint is computed from the files as written; ``final_path`` is where they will be
    once the stage's output directory is committed (repo-relative).
    """
    import dataclasses

    from pipeline.config import EMBEDDED
    from pipeline.models.loading import build_manifest

    manifest = build_manifest(EMBEDDED, checkpoint, None, trust_remote_code=False)
    return dataclasses.replace(manifest, path=final_path)


def adopt_source_model(source: str, revision: str, checkpoint_dir: Path, trust_remote_code: bool = False) -> Any:
    """The manifest of a hub id or local directory, used in place; writes ``checkpoint_dir/README.md``.

    Nothing is trained or downloaded: a missing path, a hub id absent from the local cache, a model
    that is not a supported MoE, missing, partial or truncated weights, and a tokenizer larger than
    the model's embedding are one-line errors (:func:`pipeline.models.loading.check_checkpoint`).
    """
    from pipeline.io import atomic_write_text
    from pipeline.models.loading import build_manifest, resolve_source

    local = Path(source).expanduser().exists()
    rev = None if local else revision
    path = resolve_source(source, rev)
    manifest = build_manifest(source, path, rev, trust_remote_code, check=True)
    text = (
        "# Model checkpoint (not copied)\n\n"
        f"`model.source` is `{source}`"
        + (f" (revision `{rev}`)" if rev else "")
        + ".\nThe pipeline reads the checkpoint in place from:\n\n"
        f"    {path}\n\n"
        f"Fingerprint `{manifest.fingerprint}`. Downstream stages load it from `manifest.json` (`path`)\n"
        "and check the fingerprint.\n"
    )
    atomic_write_text(checkpoint_dir / "README.md", text)
    return manifest
