"""Benchmark model variants end to end: lm-eval per variant, then speed of all variants side by side.

A variant is a checkpoint plus, for a skip variant, per-layer skip thresholds applied at run time
(``pipeline.skipping``). Every model is loaded with transformers' ``eager`` experts implementation,
the one dynamic skipping runs on, so that speed differences come from the variant, not the kernel.

Phase 1 loads one checkpoint at a time and runs lm-eval on each of its variants (peak memory is
measured per variant here, with only that model resident). Phase 2 loads every checkpoint at once
and times greedy decoding of all variants interleaved (``speed.measure_speed``).
"""

from __future__ import annotations

import gc
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import VARIANT_KINDS, BenchmarkParams
from pipeline.errors import PipelineError
from pipeline.evaluate.lmeval import Evaluation, evaluate_checkpoint_vllm, evaluate_model, task_metrics
from pipeline.evaluate.memory import PeakMemory, weight_bytes
from pipeline.evaluate.report import VariantResult
from pipeline.evaluate.speed import SpeedCase, SpeedResult, encode_prompts, measure_speed
from pipeline.evaluate.tasks import MC_SUFFIX, PPL_SUFFIX, expand_presets, select_tasks
from pipeline.io import write_json

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Variant:
    """A model variant: where its weights are, its skip thresholds (None: no skipping), and its static
    top-k (None: the checkpoint's experts per token)."""

    name: str
    checkpoint: Path
    thresholds: Mapping[str, float] | None = None
    pruned: bool = False
    top_k: int | None = None
    merged: bool = False
    recovered: bool = False

    @property
    def load_key(self) -> tuple[Path, int | None]:
        """Variants with the same key share one loaded model."""
        return Path(self.checkpoint), self.top_k

    @property
    def skip(self) -> bool:
        """Whether dynamic expert skipping is on for this variant."""
        return self.thresholds is not None


@dataclass(frozen=True)
class BenchmarkSetup:
    """The ``benchmark`` params and where the variants run (device, dtype and remote code from ``runtime``)."""

    params: BenchmarkParams
    device: torch.device
    dtype: torch.dtype
    trust_remote_code: bool


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def prompt_texts(eval_dir: str | Path) -> list[str]:
    """Speed-test prompts: the multiple-choice contexts of every domain, interleaved by domain
    (documents of the perplexity files where a domain has no multiple-choice file)."""
    eval_dir = Path(eval_dir)
    per_domain: list[list[str]] = []
    for path in sorted(eval_dir.glob(f"*{MC_SUFFIX}")) or sorted(eval_dir.glob(f"*{PPL_SUFFIX}")):
        field_name = "context" if path.name.endswith(MC_SUFFIX) else "text"
        texts = []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    value = json.loads(line).get(field_name)
                    if isinstance(value, str) and value:
                        texts.append(value)
        if texts:
            per_domain.append(texts)
    out: list[str] = []
    for i in range(max((len(t) for t in per_domain), default=0)):
        out.extend(t[i] for t in per_domain if i < len(t))
    return out


class ModelLoader:
    """Loads variants' checkpoints with the benchmark's device, dtype and device map."""

    def __init__(self, settings: BenchmarkSetup) -> None:
        self.settings = settings

    def model(self, path: Path, top_k: int | None = None) -> Any:
        """The causal LM at ``path`` (routing ``top_k`` experts per token when given), in eval mode."""
        from pipeline.models.loading import load_model

        s = self.settings
        return load_model(
            path,
            dtype=s.dtype,
            device=s.device,
            trust_remote_code=s.trust_remote_code,
            device_map=s.params.device_map,
            experts_implementation=s.params.experts_implementation,
            top_k=top_k,
        )

    def tokenizer(self, path: Path) -> Any:
        """The tokenizer saved with the checkpoint."""
        from pipeline.models.loading import load_tokenizer

        return load_tokenizer(path, self.settings.trust_remote_code)


def _by_checkpoint(variants: Sequence[Variant]) -> dict[tuple[Path, int | None], list[Variant]]:
    groups: dict[tuple[Path, int | None], list[Variant]] = {}
    for v in variants:
        groups.setdefault(v.load_key, []).append(v)
    return groups


def _experts_per_layer(model: Any) -> int | None:
    from pipeline.models import get_adapter

    try:
        return get_adapter(model.config).num_experts(model.config)
    except PipelineError:
        return None


def _release() -> None:
    """Return memory of models the caller has dropped (Python objects and the CUDA cache)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _skipping(model: Any, variant: Variant) -> Any:
    """Enable dynamic skipping on ``model`` for a skip variant; returns the handle (or None)."""
    if not variant.skip:
        return None
    from pipeline.skipping import enable

    return enable(model, dict(variant.thresholds or {}), experts_implementation=None)


#: Suffix of the per-document scores file written next to lm-eval's result (``<variant>.items.json``).
ITEMS_SUFFIX = ".items.json"


def _write_evaluation(results_dir: Path, name: str, evaluation: Evaluation) -> None:
    write_json(results_dir / f"{name}.json", _json_safe(evaluation.raw))
    items = {task: scores.to_json() for task, scores in evaluation.items.items()}
    write_json(results_dir / f"{name}{ITEMS_SUFFIX}", _json_safe({"variant": name, "tasks": items}))


def run_accuracy(
    variants: Sequence[Variant],
    settings: BenchmarkSetup,
    eval_dir: Path | None,
    results_dir: Path,
    loader: ModelLoader | None = None,
) -> dict[str, VariantResult]:
    """Phase 1: lm-eval on every variant; lm-eval's raw results go to ``results_dir/<variant>.json``,
    the per-document scores to ``results_dir/<variant>.items.json``."""
    loader = loader or ModelLoader(settings)
    results_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, VariantResult] = {}
    names, num_fewshot = expand_presets(settings.params.tasks, settings.params.num_fewshot)
    with select_tasks(names, eval_dir) as selection:
        for (path, top_k), group in _by_checkpoint(variants).items():
            if settings.params.backend == "vllm":
                for v in group:
                    if v.skip or v.top_k is not None:
                        raise PipelineError(
                            f"benchmark.variants: {v.name} changes the routing at load time, which the vllm backend "
                            "cannot do"
                        )
                    evaluation = evaluate_checkpoint_vllm(
                        path,
                        selection,
                        dtype=str(settings.dtype).removeprefix("torch."),
                        batch_size=settings.params.batch_size,
                        limit=settings.params.limit,
                        num_fewshot=num_fewshot,
                        trust_remote_code=settings.trust_remote_code,
                        model_args=settings.params.vllm_args,
                    )
                    _write_evaluation(results_dir, v.name, evaluation)
                    out[v.name] = VariantResult(
                        name=v.name,
                        tasks=task_metrics(evaluation.raw, evaluation.rows),
                        weight_bytes=0,
                        items=evaluation.items,
                    )
                continue
            model = loader.model(path, top_k)
            tokenizer = loader.tokenizer(path)
            wbytes, experts = weight_bytes(model), _experts_per_layer(model)
            for v in group:
                log.info("lm-eval: %s", v.name)
                handle = _skipping(model, v)
                try:
                    with PeakMemory(cuda=settings.device.type == "cuda") as mem:
                        evaluation = evaluate_model(
                            model,
                            tokenizer,
                            selection,
                            batch_size=settings.params.batch_size,
                            limit=settings.params.limit,
                            num_fewshot=num_fewshot,
                        )
                    skip_stats = handle.stats() if handle is not None else {}
                finally:
                    if handle is not None:
                        handle.remove()
                _write_evaluation(results_dir, v.name, evaluation)
                out[v.name] = VariantResult(
                    name=v.name,
                    tasks=task_metrics(evaluation.raw, evaluation.rows),
                    items=evaluation.items,
                    weight_bytes=wbytes,
                    experts_per_layer=experts,
                    peak_rss_bytes=mem.peak_rss_bytes,
                    peak_cuda_bytes=mem.peak_cuda_bytes,
                    extra={"rss_scope": mem.rss_scope, "lmeval_skip_stats": _json_safe(dict(skip_stats))},
                )
            del model, tokenizer
            _release()
    return out


def run_speed(
    variants: Sequence[Variant],
    settings: BenchmarkSetup,
    texts: Sequence[str],
    loader: ModelLoader | None = None,
) -> tuple[dict[str, SpeedResult], dict[str, int], dict[str, int | None]]:
    """Phase 2: every checkpoint loaded at once, all variants timed interleaved.

    Returns the speed results, weight bytes and experts per layer of each variant.
    """
    loader = loader or ModelLoader(settings)
    models: dict[tuple[Path, int | None], Any] = {}
    cases: list[SpeedCase] = []
    wbytes: dict[str, int] = {}
    experts: dict[str, int | None] = {}
    prompts: list[torch.Tensor] | None = None
    sp = settings.params.speed
    try:
        for (path, top_k), group in _by_checkpoint(variants).items():
            model = models[path, top_k] = loader.model(path, top_k)
            if prompts is None:
                limit = getattr(model.config, "max_position_embeddings", None) or 2048
                prompts = encode_prompts(loader.tokenizer(path), texts, sp.prompts, min(limit - sp.new_tokens, 1024))
            for v in group:
                cases.append(SpeedCase(name=v.name, model=model, skip=v.skip, thresholds=v.thresholds))
                wbytes[v.name] = weight_bytes(model)
                experts[v.name] = _experts_per_layer(model)
        assert prompts is not None
        results = measure_speed(cases, prompts, sp.new_tokens, sp.repeats, sp.warmup)
    finally:
        cases.clear()
        models.clear()
        model = None
        _release()
    return results, wbytes, experts


def run_benchmark(
    variants: Sequence[Variant],
    settings: BenchmarkSetup,
    eval_dir: Path | None,
    results_dir: Path,
) -> list[VariantResult]:
    """Accuracy (lm-eval) then speed of every variant.

    Under ``results_dir``: lm-eval's raw result per variant (``<variant>.json``), its per-document
    scores (``<variant>.items.json``), every timed round (``speed.json``), and per variant its checkpoint, thresholds, peak-RSS scope and the skipping
    statistics gathered during lm-eval (``variants.json``).
    """
    if not variants:
        raise PipelineError("benchmark.variants: no variant to benchmark")
    loader = ModelLoader(settings)
    accuracy = run_accuracy(variants, settings, eval_dir, results_dir, loader)
    texts = prompt_texts(eval_dir) if eval_dir is not None else []
    speed, wbytes, experts = run_speed(variants, settings, texts, loader)
    write_json(
        results_dir / "speed.json",
        _json_safe(
            {
                "settings": {
                    "prompts": settings.params.speed.prompts,
                    "new_tokens": settings.params.speed.new_tokens,
                    "repeats": settings.params.speed.repeats,
                    "warmup": settings.params.speed.warmup,
                    "batch_size": 1,
                    "decoding": "greedy",
                    "device": str(settings.device),
                    "dtype": str(settings.dtype).removeprefix("torch."),
                    "experts_implementation": settings.params.experts_implementation,
                },
                "variants": {
                    name: {
                        "tokens_per_s": r.tokens_per_s,
                        "runs_tokens_per_s": r.runs,
                        "new_tokens_per_run": r.new_tokens_per_run,
                        "expert_evals_per_token": r.expert_evals_per_token,
                        "skipped_fraction": r.skipped_fraction,
                    }
                    for name, r in speed.items()
                },
            }
        ),
    )
    out = []
    for v in variants:
        res = accuracy[v.name]
        s = speed[v.name]
        res.tokens_per_s = s.tokens_per_s
        res.tokens_per_s_runs = list(s.runs)
        res.expert_evals_per_token = s.expert_evals_per_token
        res.skipped_fraction = s.skipped_fraction
        res.weight_bytes = wbytes[v.name]
        res.experts_per_layer = experts[v.name]
        out.append(res)
    write_json(
        results_dir / "variants.json",
        _json_safe(
            {
                v.name: {
                    "checkpoint": str(v.checkpoint),
                    "skip": v.skip,
                    "thresholds": dict(v.thresholds or {}),
                    **r.extra,
                }
                for v, r in zip(variants, out, strict=True)
            }
        ),
    )
    return out


def build_variants(
    names: Sequence[str],
    original: Path,
    pruned: Path | None,
    thresholds: Mapping[str, Any] | None,
    thresholds_file: str = "outputs/skip/thresholds.json",
    moe_layers: Sequence[int] | None = None,
    merged: Path | None = None,
    recovered: Path | None = None,
) -> list[Variant]:
    """Variants by name (:data:`pipeline.config.VARIANT_KINDS`: ``original``, ``pruned``, ``merged``, their
    ``_skip`` forms, ``pruned_top1``).

    ``thresholds`` is the skip stage's thresholds document (``{"original": {layer: beta},
    "pruned": {...}, "merged": {...}}``); skip variants take their model's entry, which must cover exactly
    ``moe_layers`` (the model's MoE layers, when given). ``merged`` is the merged checkpoint
    (``outputs/export/merged``), which exists only under ``export.merge``; ``recovered`` the recover
    stage's checkpoint (``outputs/recover/model``), with its own ``"recovered"`` thresholds.
    """
    out = []
    checkpoints = {"original": original, "pruned": pruned, "merged": merged, "recovered": recovered}
    for name in names:
        if name not in VARIANT_KINDS:
            raise PipelineError(f"benchmark.variants: unknown variant {name!r} (allowed: {', '.join(VARIANT_KINDS)})")
        kind = VARIANT_KINDS[name]
        path = checkpoints[kind.checkpoint]
        if kind.checkpoint == "merged" and (path is None or not (Path(path) / "config.json").is_file()):
            raise PipelineError(
                f"benchmark.variants: {name} needs the merged checkpoint (set export.merge, then: dvc repro export)"
            )
        if kind.checkpoint == "recovered" and (path is None or not (Path(path) / "config.json").is_file()):
            raise PipelineError(f"benchmark.variants: {name} needs the recovered checkpoint (run: dvc repro recover)")
        if path is None:
            raise PipelineError(f"benchmark.variants: {name} needs the pruned checkpoint (run: dvc repro export)")
        table = None
        skip = kind.skip
        if skip:
            key = kind.checkpoint
            table = (thresholds or {}).get(key)
            if not isinstance(table, Mapping) or not table:
                raise PipelineError(
                    f"{thresholds_file}: no {key!r} thresholds for variant {name} (run: dvc repro skip_calibration)"
                )
            covered = sorted(int(k) for k in table if str(k).lstrip("-").isdigit())
            if moe_layers is not None and (covered != sorted(moe_layers) or len(covered) != len(table)):
                raise PipelineError(
                    f"{thresholds_file}: the {key!r} thresholds cover layers {', '.join(sorted(map(str, table)))}; the "
                    f"model's MoE layers are {', '.join(map(str, sorted(moe_layers)))} (run: dvc repro skip_calibration)"
                )
        out.append(
            Variant(
                name=name,
                checkpoint=Path(path),
                thresholds=table,
                pruned=kind.checkpoint != "original",
                top_k=kind.top_k,
                merged=kind.checkpoint == "merged",
                recovered=kind.checkpoint == "recovered",
            )
        )
    return out


def variant_params(
    variant: Variant,
    manifest: Mapping[str, Any],
    selection: Mapping[str, Any] | None,
    thresholds: Mapping[str, Any] | None,
    experts_per_layer: int | None = None,
) -> dict[str, Any]:
    """The settings that produced ``variant``, flattened for an MLflow run (read from the upstream
    outputs, not the current params): model facts, the pruning selection, the skip calibration."""
    params: dict[str, Any] = {
        "variant": variant.name,
        "pruned": variant.pruned,
        "merged": variant.merged,
        "recovered": variant.recovered,
        "skip": variant.skip,
        "static_top_k": variant.top_k,
        "experts_per_layer": experts_per_layer,
        "model.source": manifest.get("source"),
        "model.model_type": manifest.get("model_type"),
        "model.num_experts": manifest.get("num_experts"),
        "model.top_k": manifest.get("top_k"),
        "model.fingerprint": manifest.get("fingerprint"),
    }
    if variant.pruned and selection:
        for key in ("strategy", "mode", "r", "calibration"):
            params[f"search.{key}"] = selection.get(key)
    if variant.skip and thresholds:
        for key in ("quantile", "calibration", "rule"):
            params[f"skip.{key}"] = thresholds.get(key)
    return {k: v for k, v in params.items() if v is not None}


def describe_settings(
    manifest: Mapping[str, Any],
    selection: Mapping[str, Any] | None,
    thresholds: Mapping[str, Any] | None,
    settings: BenchmarkSetup,
    merging: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Human-readable settings for the report: model, pruning, merging, skipping, device and protocol.

    ``merging`` is the merged checkpoint's ``merging`` config entry (None: no merged checkpoint).
    """
    sel, th, sp = selection or {}, thresholds or {}, settings.params.speed
    return {
        "model": f"{manifest.get('source')} ({manifest.get('model_type')}, {manifest.get('num_experts')} experts, "
        f"top-{manifest.get('top_k')})",
        "pruning": f"{sel.get('strategy')} / {sel.get('mode')}, r={sel.get('r')}, calibration {sel.get('calibration')}",
        "merging": (
            f"{merging.get('method')} (reconstruction loss {merging.get('loss_pruned'):.6g} pruned, "
            f"{merging.get('loss_merged'):.6g} merged)"
            if merging else "-"
        ),
        "static top-k": ", ".join(
            f"{name}: top-{VARIANT_KINDS[name].top_k}" for name in settings.params.variants
            if VARIANT_KINDS[name].top_k is not None
        ) or "-",
        "skipping": f"quantile {th.get('quantile')}, calibration {th.get('calibration')}" if thresholds else "-",
        "device / dtype": f"{settings.device} / {str(settings.dtype).removeprefix('torch.')} "
        f"(device_map {settings.params.device_map}), experts implementation {settings.params.experts_implementation}",
        "lm-eval": f"backend {settings.params.backend}{f' {dict(settings.params.vllm_args)}' if settings.params.backend == 'vllm' and settings.params.vllm_args else ''}, tasks {list(settings.params.tasks)}, "
        f"num_fewshot {dict(settings.params.num_fewshot)}, limit {settings.params.limit}, batch size {settings.params.batch_size}",
        "speed": f"greedy, batch size 1, {sp.prompts} prompts x {sp.new_tokens} new tokens, median of {sp.repeats} "
        f"interleaved repeats after {max(1, sp.warmup)} untimed",
    }
