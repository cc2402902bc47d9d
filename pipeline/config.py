"""The params schema: every key of params.yaml, its type, range and allowed values.

Each stage validates the whole file before doing any work, so a typo in any section stops the
first stage that runs, with one line naming the key path and what is allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import PipelineError
from pipeline.search.registry import BASELINE_NAMES, STRATEGY_NAMES

EMBEDDED = "embedded"
DOMAINS = ("prose", "code", "arith", "data")
VARIANTS = ("original", "original_skip", "pruned", "pruned_skip")

NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
StrategyName = Literal[STRATEGY_NAMES]  # type: ignore[valid-type]  # the strategy registry's names
BaselineName = Literal[BASELINE_NAMES]  # type: ignore[valid-type]


def validate_r(r: int, n: int | None = None, top_k: int | None = None, *, key: str = "search.r", keep_all: bool = False) -> None:
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


def _value_error(check: Any, *args: Any) -> None:
    """Run ``check(*args)`` in a validator: its PipelineError becomes the ValueError pydantic reports."""
    try:
        check(*args)
    except PipelineError as exc:
        raise ValueError(str(exc)) from None


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TrackingParams(Section):
    """MLflow settings (the tracking URI comes from MLFLOW_TRACKING_URI, else the repo's SQLite store)."""

    experiment: str = Field("moe-expert-pruning", min_length=1)
    enabled: bool = True


class RuntimeParams(Section):
    """Where and in which precision models run."""

    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    threads: NonNegInt = 0
    offload: Literal["auto", "none", "layers"] = "auto"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be auto, cpu, cuda or cuda:N")


class CorpusEvalParams(Section):
    """Held-out benchmark data written by the corpus stage."""

    mc_items_per_domain: PosInt = 150
    mc_choices: Annotated[int, Field(ge=2, le=8)] = 4
    context_chars: Annotated[int, Field(ge=16)] = 160
    continuation_chars: Annotated[int, Field(ge=8)] = 60
    ppl_docs_per_domain: PosInt = 24
    ppl_doc_chars: Annotated[int, Field(ge=32)] = 600


class CorpusParams(Section):
    """The offline multi-domain corpus."""

    seed: Seed = 1234
    domains: list[Literal["prose", "code", "arith", "data"]] = Field(default_factory=lambda: ["prose", "code", "arith"])
    max_chars_per_domain: Annotated[int, Field(ge=10_000)] = 1_000_000
    doc_chars: Annotated[int, Field(ge=64)] = 1200
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

    seq_len: Annotated[int, Field(ge=8)] = 128
    batch_size: PosInt = 16
    steps: PosInt = 900
    lr: Annotated[float, Field(gt=0.0, lt=1.0)] = 3e-3
    warmup_steps: NonNegInt = 60
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    router_aux_loss_coef: Annotated[float, Field(ge=0.0)] = 0.01
    eval_tokens_per_domain: PosInt = 16384
    seed: Seed = 0


class EmbeddedModelParams(Section):
    """Shape of the small MoE the pipeline trains when ``model.source`` is ``embedded``."""

    architecture: Literal["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3"] = "mixtral"
    vocab_size: Annotated[int, Field(ge=260)] = 4096
    hidden_size: Annotated[int, Field(ge=8)] = 128
    intermediate_size: PosInt = 256
    num_layers: PosInt = 4
    num_heads: PosInt = 4
    num_kv_heads: PosInt = 2
    num_experts: Annotated[int, Field(ge=2)] = 8
    top_k: PosInt = 2
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

    source: str = Field(EMBEDDED, min_length=1)
    revision: str = "main"
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

    seed: Seed = 42
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

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: PosInt = 8


class EvolutionaryParams(Section):
    """EEP-style evolutionary search."""

    population: Annotated[int, Field(ge=2)] = 16
    mutation: Fraction = 0.15
    crossover: Fraction = 0.3
    budget: PosInt = 400


class SearchParams(Section):
    """Which ``r`` of the ``n`` experts each MoE layer keeps."""

    calibration: str = Field("general", min_length=1)
    r: int = 6
    strategy: StrategyName = "auto"
    mode: Literal["layerwise", "progressive"] = "layerwise"
    enumerate_budget: PosInt = 100_000
    beam_width: PosInt = 4
    evolutionary: EvolutionaryParams = EvolutionaryParams()
    baselines: list[BaselineName] = Field(default_factory=lambda: list(BASELINE_NAMES))
    loss_batch_size: PosInt = 1
    token_chunk: PosInt = 8192
    verify: bool = True
    seed: Seed = 0

    @field_validator("r")
    @classmethod
    def _r(cls, v: int) -> int:
        _value_error(validate_r, v)
        return v


class ExportParams(Section):
    """The pruned Hugging Face checkpoint."""

    max_shard_size: str = "5GB"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class SkipParams(Section):
    """Dynamic expert skipping: per-layer threshold = a quantile of the tail/head weight ratio."""

    quantile: Fraction = 0.5
    calibration: str = Field("general", min_length=1)
    batch_size: PosInt = 8


class SpeedParams(Section):
    """Greedy decoding at batch size 1."""

    prompts: PosInt = 4
    new_tokens: PosInt = 48
    repeats: PosInt = 5
    warmup: NonNegInt = 1


class BenchmarkParams(Section):
    """lm-eval accuracy/perplexity plus speed and memory of the variants."""

    tasks: list[str] = Field(default_factory=lambda: [EMBEDDED], min_length=1)
    num_fewshot: dict[str, NonNegInt] = Field(default_factory=dict)
    limit: PosInt | None = 60
    batch_size: PosInt = 16
    variants: list[Literal["original", "original_skip", "pruned", "pruned_skip"]] = Field(
        default_factory=lambda: list(VARIANTS), min_length=1
    )
    backend: Literal["hf", "vllm"] = "hf"
    device_map: str | None = None
    vllm_args: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    experts_implementation: Literal["eager", "grouped_mm"] = "eager"
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
    skip: SkipParams = SkipParams()
    benchmark: BenchmarkParams = BenchmarkParams()

    @model_validator(mode="after")
    def _cross(self) -> Params:
        names = sorted(self.calibration.sets)
        for key, value in (("search.calibration", self.search.calibration), ("skip.calibration", self.skip.calibration)):
            if value not in self.calibration.sets:
                raise ValueError(f"{key}: calibration set {value!r} does not exist (defined: {', '.join(names)})")
        if self.model.source == EMBEDDED:
            emb = self.model.embedded
            _value_error(validate_r, self.search.r, emb.num_experts, emb.top_k)
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
    if msg.startswith(("search.", "skip.", "calibration.")) and kind == "value_error":
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
        errors = exc.errors()
        first = _format_error(errors[0])
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise PipelineError(f"{origin}: {first}{more}") from None


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
