"""The params schema: every key of params.yaml, its type, range and allowed values.

Each stage validates the whole file before doing any work, so a typo in any section stops the
first stage that runs, with one line naming the key path and what is allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import PipelineError
from pipeline.search.registry import BASELINE_NAMES, STRATEGY_NAMES

EMBEDDED = "embedded"
DOMAINS = ("prose", "code", "arith", "data")


class VariantKind(NamedTuple):
    """What a benchmark variant runs: which checkpoint, with dynamic skipping, with a lowered top-k."""

    #: manifest.path | outputs/export/model | outputs/export/merged | outputs/recover/model
    checkpoint: Literal["original", "pruned", "merged", "recovered"]
    skip: bool = False  # dynamic expert skipping with the skip stage's thresholds for that checkpoint
    top_k: int | None = None  # static top-k reduction: experts per token, set in the config at load time


#: The one declaration of the benchmark's variant names and what each runs.
VARIANT_KINDS: dict[str, VariantKind] = {
    "original": VariantKind("original"),
    "original_skip": VariantKind("original", skip=True),
    "pruned": VariantKind("pruned"),
    "pruned_skip": VariantKind("pruned", skip=True),
    "pruned_top1": VariantKind("pruned", top_k=1),
    "merged": VariantKind("merged"),
    "merged_skip": VariantKind("merged", skip=True),
    "recovered": VariantKind("recovered"),
    "recovered_skip": VariantKind("recovered", skip=True),
}
VARIANTS = tuple(VARIANT_KINDS)
#: The default ``benchmark.variants`` (each variant adds about 25 s to the default benchmark).
DEFAULT_VARIANTS = ("original", "original_skip", "pruned", "pruned_skip")
VariantName = Literal[VARIANTS]  # type: ignore[valid-type]
#: ``recover.steps`` default: router-only distillation that costs well under a minute on the embedded default.
DEFAULT_RECOVER_STEPS = 8
#: ``recover.targets``: what the distillation trains (each target its own ``recover.lr_<target>``; ``both`` trains both).
RECOVER_TARGETS = ("router", "lora", "both")
#: ``export.merge`` methods: how each dropped expert is assigned to a kept one (docs/merging.md).
MERGE_METHODS = ("none", "output", "router")

NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
StrategyName = Literal[STRATEGY_NAMES]  # type: ignore[valid-type]  # the strategy registry's names
BaselineName = Literal[BASELINE_NAMES]  # type: ignore[valid-type]


def validate_r(
    r: int, n: int | None = None, top_k: int | None = None, *, key: str = "search.r", keep_all: bool = False
) -> None:
    """Raise a one-line PipelineError unless ``r`` experts kept of ``n`` with top-``top_k`` routing is valid.

    ``r`` must be positive, at least ``top_k`` and below ``n`` (at most ``n`` with ``keep_all``: an
    export keeping every expert); a bound whose model value is None is not checked.
    """
    if r <= 0:
        raise PipelineError(f"{key}: must be a positive number of experts to keep (got {r})")
    if n is not None and r >= n + keep_all:
        bound = "at most" if keep_all else "below"
        raise PipelineError(f"{key}: must be {bound} the model's {n} experts (got {r})")
    if top_k is not None and r < top_k:
        raise PipelineError(f"{key}: must be at least the model's top_k={top_k} (got {r})")


def validate_top_k(k: int, top_k: int | None = None, *, key: str = "export.top_k") -> None:
    """Raise a one-line PipelineError unless ``k`` experts per token is a reduction of the model's ``top_k``."""
    if k <= 0:
        raise PipelineError(f"{key}: must be a positive number of experts per token (got {k})")
    if top_k is not None and k >= top_k:
        raise PipelineError(f"{key}: must be below the model's top_k={top_k} (got {k})")


def _value_error(check: Any, *args: Any) -> None:
    """Run ``check(*args)`` in a validator: its PipelineError becomes the ValueError pydantic reports."""
    try:
        check(*args)
    except PipelineError as exc:
        raise ValueError(str(exc)) from None


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


SectionT = TypeVar("SectionT", bound=Section)


class TrackingParams(Section):
    """MLflow settings (the tracking URI comes from MLFLOW_TRACKING_URI, else the repo's SQLite store)."""

    experiment: str = Field(
        "moe-expert-pruning",
        min_length=1,
        description="MLflow experiment; the store is MLFLOW_TRACKING_URI or ./mlflow.db",
    )
    enabled: bool = Field(True, description="false: no MLflow runs (stages still write run.json)")


class RuntimeParams(Section):
    """Where and in which precision models run."""

    device: str = Field("auto", description="auto (CUDA when present) | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16",
    )
    trust_remote_code: bool = Field(False, description="let transformers run a model repo's own code (warns when true)")
    threads: NonNegInt = Field(0, description="CPU threads for torch; 0 = torch's default")
    offload: Literal["auto", "none", "layers"] = Field(
        "auto",
        description=(
            "layers: decoder layers stay in the checkpoint and are read one at a time (activations, search, "
            "skip_calibration); auto: when the weights exceed half the free RAM; none"
        ),
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be auto, cpu, cuda or cuda:N")


class CorpusEvalParams(Section):
    """Held-out benchmark data written by the corpus stage."""

    mc_items_per_domain: PosInt = Field(
        150,
        description="multiple-choice items: true continuation / correct result vs distractors",
    )
    mc_choices: Annotated[int, Field(ge=2, le=8)] = 4
    context_chars: Annotated[int, Field(ge=16)] = 160
    continuation_chars: Annotated[int, Field(ge=8)] = 60
    ppl_docs_per_domain: PosInt = Field(
        64,
        description="documents for per-domain rolling perplexity (at most; 64 takes every test document of the default corpus)",
    )
    ppl_doc_chars: Annotated[int, Field(ge=32)] = 600


class CorpusParams(Section):
    """The offline multi-domain corpus."""

    seed: Seed = 1234
    domains: list[Literal["prose", "code", "arith", "data"]] = Field(
        default_factory=lambda: ["prose", "code", "arith"],
        description="prose (Python docs and docstrings), code (stdlib source), arith, data",
    )
    max_chars_per_domain: Annotated[int, Field(ge=10_000)] = Field(
        1_000_000,
        description="at most this many characters per domain (prose has about 1.8M in all)",
    )
    doc_chars: Annotated[int, Field(ge=64)] = Field(1200, description="documents are cut to about this many characters")
    validation_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.05
    test_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.05
    eval: CorpusEvalParams = CorpusEvalParams()

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        if len(v) < 2 or len(set(v)) != len(v):
            raise ValueError("must list at least two distinct domains")
        return v


class TrainParams(Section):
    """Training of the embedded model."""

    seq_len: Annotated[int, Field(ge=8)] = Field(128, description="tokens per packed training sequence")
    batch_size: PosInt = Field(16, description="sequences per step (also per evaluation batch)")
    steps: PosInt = Field(450, description="450 x 16 x 128 = 0.92M tokens, about one epoch: ~4 min on 2 cores")
    lr: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(4e-3, description="peak learning rate")
    warmup_steps: NonNegInt = Field(40, description="linear warmup, then cosine decay to 10% of lr")
    weight_decay: Annotated[float, Field(ge=0.0)] = Field(0.01, description="on matrices only")
    router_aux_loss_coef: Annotated[float, Field(ge=0.0)] = Field(
        0.05,
        description="weight of the per-layer router load-balancing loss (0.05: every expert >= 0.5x uniform)",
    )
    eval_tokens_per_domain: PosInt = Field(
        16384,
        description="validation tokens per domain for perplexity and routing plots",
    )
    seed: Seed = Field(0, description="initialisation and batch order")


class EmbeddedModelParams(Section):
    """Shape of the small MoE the pipeline trains when ``model.source`` is ``embedded``."""

    architecture: Literal["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3"] = Field(
        "mixtral",
        description=(
            "mixtral | qwen3_moe | olmoe | qwen2_moe | deepseek_v3 (same sizes; qwen2_moe/deepseek_v3 add a shared "
            "expert, deepseek_v3 a dense first layer)"
        ),
    )
    vocab_size: Annotated[int, Field(ge=260)] = Field(
        4096,
        description="byte-level BPE entries, <|endoftext|> included",
    )
    hidden_size: Annotated[int, Field(ge=8)] = 128
    intermediate_size: PosInt = Field(256, description="per expert (and of shared experts / dense layers)")
    num_layers: PosInt = 4
    num_heads: PosInt = 4
    num_kv_heads: PosInt = Field(
        2,
        description="grouped-query attention (deepseek_v3 uses latent attention and ignores it)",
    )
    num_experts: Annotated[int, Field(ge=2)] = Field(8, description="routed experts per MoE layer")
    top_k: PosInt = Field(2, description="experts per token")
    max_position_embeddings: Annotated[int, Field(ge=16)] = 512
    train: TrainParams = TrainParams()

    @model_validator(mode="after")
    def _shape(self) -> EmbeddedModelParams:
        if self.top_k >= self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be below num_experts ({self.num_experts})")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        return self


class ModelParams(Section):
    """Which model the pipeline prunes: the embedded toy model, a hub id or a local directory."""

    source: str = Field(
        EMBEDDED,
        min_length=1,
        description="embedded (trained here) | hub id (mistralai/Mixtral-8x7B-v0.1) | local directory",
    )
    revision: str = Field("main", description="hub revision when source is a hub id")
    embedded: EmbeddedModelParams = EmbeddedModelParams()


class CorpusSource(Section):
    """Text from domains of the embedded corpus."""

    type: Literal["corpus"]
    domains: list[Literal["prose", "code", "arith", "data"]] = Field(min_length=1)
    split: Literal["train", "validation", "test"] = "train"
    weight: Annotated[float, Field(gt=0.0)] = 1.0


class HubSource(Section):
    """Text from a Hugging Face hub dataset (needs the dataset in the local cache when offline)."""

    type: Literal["hub"]
    id: str = Field(min_length=1)
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    revision: str | None = None
    data_files: list[str] | None = None  # files inside the dataset repo, e.g. one C4 shard
    streaming: bool = False
    weight: Annotated[float, Field(gt=0.0)] = 1.0


class LocalSource(Section):
    """Text from a local jsonl, json, parquet or txt file."""

    type: Literal["local"]
    path: str = Field(min_length=1)
    format: Literal["auto", "jsonl", "json", "parquet", "txt"] = "auto"
    text_field: str = "text"
    weight: Annotated[float, Field(gt=0.0)] = 1.0


Source = Annotated[CorpusSource | HubSource | LocalSource, Field(discriminator="type")]


class CalibrationSet(Section):
    """One named calibration set: ``num_samples`` sequences of ``seq_len`` tokens."""

    num_samples: PosInt = 64
    seq_len: Annotated[int, Field(ge=2)] = 128
    packing: bool = True
    sources: list[Source] = Field(min_length=1)


class CalibrationParams(Section):
    """Named calibration sets; later stages choose one by name."""

    seed: Seed = Field(42, description="paper: C4 English, 128 x 2048 tokens, seed 42 (see docs/tutorial.md)")
    sets: dict[str, CalibrationSet] = Field(min_length=1)

    @field_validator("sets")
    @classmethod
    def _names(cls, v: dict[str, CalibrationSet]) -> dict[str, CalibrationSet]:
        for name in v:
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"set name {name!r} must use letters, digits, '-' and '_'")
        return v


class ActivationsParams(Section):
    """Caching of every MoE block's input on the calibration tokens."""

    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype of the cached MoE inputs on disk",
    )
    batch_size: PosInt = Field(8, description="sequences per forward pass")


class EvolutionaryParams(Section):
    """EEP-style evolutionary search."""

    population: Annotated[int, Field(ge=2)] = 16
    mutation: Fraction = 0.15
    crossover: Fraction = 0.3
    budget: PosInt = Field(400, description="candidates evaluated in all")


#: Strategies that report the best set of every size (``search.allocation: global``).
GLOBAL_STRATEGIES = ("auto", "enumerate", "greedy", "beam")


class SearchParams(Section):
    """Which ``r`` of the ``n`` experts each MoE layer keeps."""

    calibration: str = Field(
        "general",
        min_length=1,
        description="which calibration set's activations drive the search",
    )
    r: int = Field(6, description="experts kept per MoE layer (top_k <= r < num_experts); the mean under allocation global")
    allocation: Literal["uniform", "global"] = Field(
        "uniform",
        description="uniform (r in every layer) | global (r x layers in all, split across layers to minimise "
        "the sum of relative losses; layerwise mode, strategy auto, enumerate, greedy or beam)",
    )
    strategy: StrategyName = Field(
        "auto", description="how each layer's kept set is chosen (the strategies of docs/search.md)"
    )
    mode: Literal["layerwise", "progressive"] = Field(
        "layerwise",
        description="layerwise (inputs from the original model) | progressive",
    )
    enumerate_budget: PosInt = Field(100_000, description="auto enumerates when C(n, r) <= this, else beam")
    beam_width: PosInt = 4
    evolutionary: EvolutionaryParams = EvolutionaryParams()
    baselines: list[BaselineName] = Field(
        default_factory=lambda: list(BASELINE_NAMES),
        description="scored in every layer next to the chosen set",
    )
    loss_batch_size: PosInt = Field(1, description="calibration sequences per batch b in sum_b ||Z_b - Z_hat_b||_F")
    token_chunk: PosInt = Field(8192, description="tokens per expert pass (memory bound of the search)")
    verify: bool = Field(True, description="recompute the winner's loss directly and check it")
    seed: Seed = 0

    @field_validator("r")
    @classmethod
    def _r(cls, v: int) -> int:
        _value_error(validate_r, v)
        return v

    @model_validator(mode="after")
    def _allocation(self) -> SearchParams:
        if self.allocation == "global":
            if self.mode != "layerwise":
                raise ValueError("allocation global needs mode layerwise (progressive mode prunes each layer before the next is searched)")
            if self.strategy not in GLOBAL_STRATEGIES:
                raise ValueError(
                    f"allocation global needs a strategy that scores every size ({', '.join(GLOBAL_STRATEGIES)}), "
                    f"not {self.strategy!r}"
                )
        return self


class ExportParams(Section):
    """The pruned Hugging Face checkpoint."""

    max_shard_size: str = Field("5GB", description="safetensors shard size of the pruned checkpoint")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto keeps the model's dtype")
    merge: Literal[MERGE_METHODS] = Field(  # type: ignore[valid-type]
        "none",
        description=(
            "none | output | router: also write outputs/export/merged, the pruned model with each dropped expert "
            "folded into the kept expert with the most similar mean output (output) or router logits (router), "
            "weights averaged by routing mass after neuron alignment (docs/merging.md)"
        ),
    )
    top_k: PosInt | None = Field(
        None,
        description="static top-k reduction: experts per token of the exported checkpoints (below the model's top_k); "
        "null keeps the model's",
    )


class RecoverParams(Section):
    """Recovery fine-tuning: distil the original model into the exported pruned one (docs/recovery.md)."""

    steps: NonNegInt = Field(
        DEFAULT_RECOVER_STEPS,
        description="optimizer steps; 0 passes the exported checkpoint through unchanged (the same files)",
    )
    targets: Literal[RECOVER_TARGETS] = Field(  # type: ignore[valid-type]
        "router",
        description="router (the MoE routers' weights only) | lora (LoRA on attention, dense/shared linears and the "
        "fused experts, merged back) | both",
    )
    calibration: str = Field(
        "general",
        min_length=1,
        description="calibration set the student trains on (any calibration.sets entry, e.g. one over a train split)",
    )
    lr_router: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        1e-3, description="peak AdamW learning rate of the routers (targets router/both; cosine decay to 10%)"
    )
    lr_lora: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        3e-4, description="peak AdamW learning rate of the LoRA adapters (targets lora/both; cosine decay to 10%)"
    )
    temperature: Annotated[float, Field(gt=0.0)] = Field(2.0, description="tau of KL(softmax(z_t/tau) || softmax(z_s/tau)) tau^2")
    lm_loss_weight: Annotated[float, Field(ge=0.0)] = Field(0.0, description="weight of the student's next-token loss added to the KL")
    batch_size: PosInt = Field(8, description="calibration sequences per step")
    lora_rank: PosInt = Field(8, description="LoRA rank (targets lora/both)")
    lora_alpha: Annotated[float, Field(gt=0.0)] = Field(16.0, description="LoRA alpha (scale alpha / rank)")
    checkpoint_every: PosInt = Field(4, description="steps between resumable checkpoints in outputs/.work/recover")
    seed: Seed = Field(0, description="batch order and LoRA initialisation")


class SkipParams(Section):
    """Dynamic expert skipping: per-layer threshold = a quantile of the tail/head weight ratio."""

    quantile: Fraction = Field(0.5, description="beta = this quantile of w_k / (w_1 + ... + w_{k-1}); paper: median")
    calibration: str = Field("general", min_length=1, description="calibration set the thresholds are measured on")
    batch_size: PosInt = Field(8, description="sequences per forward pass while calibrating and measuring")


class SpeedParams(Section):
    """Greedy decoding at batch size 1."""

    prompts: PosInt = Field(2, description="prompts (multiple-choice contexts of the corpus eval data)")
    new_tokens: PosInt = Field(32, description="tokens generated per prompt (exactly; EOS suppressed)")
    repeats: PosInt = Field(
        15,
        description="timed rounds; all variants interleaved each round; median reported (a faster / slower "
        "verdict needs at least 6; many short rounds beat few long ones on a noisy machine)",
    )
    warmup: NonNegInt = Field(
        1,
        description="untimed rounds first (the first also counts expert evaluations per token)",
    )


class BenchmarkParams(Section):
    """lm-eval accuracy/perplexity plus speed and memory of the variants."""

    tasks: list[str] = Field(
        default_factory=lambda: [EMBEDDED],
        min_length=1,
        description=(
            "embedded (corpus stage's tasks) | paper (boolq rte arc_* hellaswag winogrande openbookqa mmlu; gsm8k "
            "5-shot) | lm-eval names"
        ),
    )
    num_fewshot: dict[str, NonNegInt] = Field(
        default_factory=dict,
        description="per task (or group/tag, or embedded), e.g. {gsm8k: 5}; unset tasks keep lm-eval's default",
    )
    limit: PosInt | None = Field(
        None,
        description="at most this many documents per task (e.g. to try a large model quickly); null = all",
    )
    batch_size: PosInt = Field(16, description="lm-eval batch size for log-likelihood requests")
    variants: list[VariantName] = Field(
        default_factory=lambda: list(DEFAULT_VARIANTS),
        min_length=1,
        description=(
            "original | original_skip | pruned | pruned_skip | pruned_top1 (top-1 routing) | merged | merged_skip "
            "(merged needs export.merge) | recovered | recovered_skip (the recover stage's checkpoint)"
        ),
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf (in-memory model, skipping applies) | vllm (exported checkpoints only; skip variants left out)",
    )
    device_map: str | None = Field(
        None,
        description="e.g. auto: spread a large model over GPUs and CPU with accelerate (hf backend and the speed test)",
    )
    vllm_args: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict,
        description=(
            "extra model_args of lm-eval's vllm backend, e.g. {tensor_parallel_size: 2, gpu_memory_utilization: "
            "0.85, max_model_len: 4096}"
        ),
    )
    experts_implementation: Literal["eager", "grouped_mm"] = Field(
        "eager",
        description=(
            "transformers experts kernel of every variant: eager (per-expert loop) | grouped_mm (one grouped GEMM; "
            "fast on GPUs); both skip the skipped slots"
        ),
    )
    speed: SpeedParams = SpeedParams()


class Params(Section):
    """The whole params.yaml."""

    tracking: TrackingParams = TrackingParams()
    runtime: RuntimeParams = RuntimeParams()
    corpus: CorpusParams = CorpusParams()
    model: ModelParams = ModelParams()
    calibration: CalibrationParams
    activations: ActivationsParams = ActivationsParams()
    search: SearchParams = SearchParams()
    export: ExportParams = ExportParams()
    recover: RecoverParams = RecoverParams()
    skip: SkipParams = SkipParams()
    benchmark: BenchmarkParams = BenchmarkParams()

    @model_validator(mode="after")
    def _cross(self) -> Params:
        names = sorted(self.calibration.sets)
        for key, value in (
            ("search.calibration", self.search.calibration),
            ("skip.calibration", self.skip.calibration),
            ("recover.calibration", self.recover.calibration),
        ):
            if value not in self.calibration.sets:
                raise ValueError(f"{key}: calibration set {value!r} does not exist (defined: {', '.join(names)})")
        if self.model.source == EMBEDDED:
            emb = self.model.embedded
            _value_error(validate_r, self.search.r, emb.num_experts, emb.top_k)
            if self.export.top_k is not None:
                _value_error(validate_top_k, self.export.top_k, emb.top_k)
            for name, cs in self.calibration.sets.items():
                if cs.seq_len > emb.max_position_embeddings:
                    raise ValueError(
                        f"calibration.sets.{name}.seq_len: {cs.seq_len} exceeds the model's "
                        f"max_position_embeddings={emb.max_position_embeddings}"
                    )
        return self


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("corpus", "hub", "local") and parts and parts[-1].startswith("["):
            continue  # discriminated-union tag, not a key the user wrote
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _format_error(err: dict[str, Any]) -> str:
    loc = _format_loc(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid"))
    if kind == "extra_forbidden":
        return f"{loc}: unknown key (check the spelling against docs/params.md)"
    if kind == "missing":
        return f"{loc}: required key is missing"
    msg = msg.removeprefix("Value error, ")
    if msg.startswith(("search.", "skip.", "calibration.", "export.", "recover.")) and kind == "value_error":
        return msg
    shown = err.get("input")
    got = "" if isinstance(shown, dict | list) else f" (got {shown!r})"
    return f"{loc}: {msg}{got}" if loc else f"{msg}{got}"


def validate(raw: Any, origin: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; raise a one-line PipelineError naming the first bad key."""
    if not isinstance(raw, dict):
        raise PipelineError(f"{origin}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise PipelineError(f"{origin}: {_one_line(exc)}") from None


def _one_line(exc: ValidationError, within: tuple[str, ...] = ()) -> str:
    """The first error of ``exc`` (its location prefixed by the keys ``within``), plus how many more."""
    errors = exc.errors()
    first = _format_error({**errors[0], "loc": (*within, *errors[0].get("loc", ()))})
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{first}{more}"


def section(cls: type[SectionT], key: str, **values: Any) -> SectionT:
    """The params section ``cls`` (the one at ``key`` in params.yaml) from ``values``, the rest at their
    defaults, validated as params.yaml is: a bad value raises a one-line PipelineError naming ``key.<field>``."""
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise PipelineError(_one_line(exc, tuple(key.split(".")))) from None


def load_params(path: str | os.PathLike[str] = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid syntax"
        raise PipelineError(f"{path} is not valid YAML{where}: {problem}") from None
    return validate(raw, origin=str(path))


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested params into dotted keys (lists and None kept as values)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, Any] = {}
    if isinstance(obj, dict) and obj:
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    out[prefix[:-1]] = obj
    return out


def schema_reference() -> list[tuple[str, str, str, str]]:
    """Rows (key, type, default, description) for every params key, for the generated docs."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = field.annotation
            sub = _section_type(ann)
            if sub is not None:
                rows.append((key, "section", "", (sub.__doc__ or "").strip().splitlines()[0]))
                walk(sub, key + ".")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            rows.append((key, _type_name(ann, field), default, field.description or ""))

    walk(Params, "")
    return rows


def _section_type(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, Section):
        return ann
    return None


def _optional_bound(m: re.Match[str]) -> str:
    sym = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}.get(m.group(3), m.group(3))
    return f"{m.group(1)} ({sym} {m.group(4)}) or null"


def _type_name(ann: Any, field: Any) -> str:
    text = re.sub(r"<class '([\w.]+)'>", r"\1", str(ann)).replace("typing.", "").replace("pipeline.config.", "")
    text = re.sub(r"Literal\[([^\]]*)\]", lambda m: "one of " + m.group(1).replace("'", ""), text)
    text = text.replace("Annotated[", "").replace("NoneType", "None")
    text = re.sub(r"Optional\[(\w+), FieldInfo\(.*?metadata=\[(\w+)\((\w+)=([^)]*)\)\]\)\]\]", _optional_bound, text)
    bounds = []
    for meta in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "min length")):
            value = getattr(meta, attr, None)
            if value is not None:
                bounds.append(f"{sym} {value}")
    return text + (" (" + ", ".join(bounds) + ")" if bounds else "")
