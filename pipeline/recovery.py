"""Recovery fine-tuning: distil the original model (teacher) into the pruned one (student).

Loss per step (method.md §11): ``KL(softmax(z_t / tau) || softmax(z_s / tau)) * tau^2`` averaged over
tokens, plus ``lm_loss_weight`` times the student's next-token cross-entropy. What trains is named by
``targets``: ``router`` (the router weights and biases of every MoE block, found through the adapter),
``lora`` (peft LoRA on every linear layer of the decoder outside the routers: attention, shared
experts, dense MLPs; and on the routed experts' fused 3-D weights through peft's
``target_parameters``), or ``both``. The routers train at ``lr_router`` and the LoRA adapters at
``lr_lora`` (two AdamW parameter groups under ``both``). LoRA is merged back before saving, so the
result is a plain transformers checkpoint with the student's tensor names, shapes and files. The
settings are the ``recover.*`` params themselves (``pipeline.config.RecoverParams``; library callers
build them with ``pipeline.config.section(RecoverParams, "recover", ...)`` for one-line errors).

Training is a pure function of the inputs and the seed: batch ``s`` is drawn from a permutation
seeded by ``(seed, epoch)``, the learning rate is a function of the step, and every
``checkpoint_every`` steps the trainable tensors, the optimizer state, the torch RNG state and the
curve so far are written atomically to ``work_dir``; a run started again with the same inputs
resumes there and ends with the same tensors as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import RecoverParams
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, fingerprint, load_tensors, read_json, save_tensors
from pipeline.models.base import MoEAdapter

log = logging.getLogger(__name__)

#: The resumable state inside ``work_dir``.
STATE_FILE = "state.safetensors"


@dataclass
class RecoveryReport:
    """What a run did: the curve (one entry per step), how many tensors trained, its cost."""

    settings: RecoverParams
    curve: list[dict[str, float]] = field(default_factory=list)
    trainable_parameters: int = 0
    resumed_at: int = 0
    seconds: float = 0.0

    def metrics(self) -> dict[str, Any]:
        """Summary metrics for ``metrics.json`` (first and last step's losses, trainable parameters, time)."""
        out: dict[str, Any] = {
            "steps": self.settings.steps,
            "targets": self.settings.targets,
            "trainable_parameters": self.trainable_parameters,
            "resumed_at_step": self.resumed_at,
            "seconds": round(self.seconds, 3),
        }
        if self.curve:
            for key in ("kl", "lm", "loss"):
                out[f"{key}_first"] = self.curve[0][key]
                out[f"{key}_last"] = self.curve[-1][key]
        return out


# -- losses ---------------------------------------------------------------------------------------
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(z_t / tau) || softmax(z_s / tau)) * tau^2``, averaged over tokens (logits ``[..., V]``)."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.mean() * temperature**2


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``logits`` ``[B, L, V]`` on ``input_ids`` ``[B, L]``."""
    return nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten())


def batch_indices(num_samples: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The sample indices of ``step``: consecutive slices of a per-epoch permutation seeded by ``(seed, epoch)``."""
    size = min(batch_size, num_samples)
    per_epoch = num_samples // size
    epoch, slot = divmod(step, per_epoch)
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[slot * size : (slot + 1) * size]


def learning_rate(peak: float, step: int, steps: int) -> float:
    """Cosine decay from ``peak`` to 10% of it over ``steps`` (no warmup: the student starts trained)."""
    progress = step / max(1, steps)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -- what trains ----------------------------------------------------------------------------------
def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def router_parameters(model: nn.Module, adapter: MoEAdapter) -> dict[str, nn.Parameter]:
    """The router weight (and bias) of every MoE block, by parameter name."""
    wanted = set()
    for layer in adapter.decoder_layers(model):
        block = adapter.moe_block(layer)
        if block is None:
            continue
        wanted.add(id(adapter.router_weight(block)))
        bias = adapter.router_bias(block)
        if bias is not None:
            wanted.add(id(bias))
    return {name: p for name, p in model.named_parameters() if id(p) in wanted}


def lora_targets(model: nn.Module, adapter: MoEAdapter) -> tuple[list[str], list[str]]:
    """``(module names, parameter names)`` for LoRA: every ``nn.Linear`` of the decoder layers except the
    routers, and the routed experts' fused weight tensors (``experts.gate_up_proj``, ``experts.down_proj``)."""
    names = _module_names(model)
    routers = set(id(p) for p in router_parameters(model, adapter).values())
    modules: list[str] = []
    params: list[str] = []
    for layer in adapter.decoder_layers(model):
        for sub in layer.modules():
            if isinstance(sub, nn.Linear) and id(sub.weight) not in routers:
                modules.append(names[id(sub)])
        block = adapter.moe_block(layer)
        if block is None:
            continue
        experts = getattr(block, adapter.experts_attr, None)
        if experts is not None and id(experts) in names:
            params += [f"{names[id(experts)]}.{leaf}" for leaf, t in adapter.expert_tensors(block).items() if t.dim() in (2, 3)]
    return modules, params


def prepare_student(model: nn.Module, adapter: MoEAdapter, settings: RecoverParams) -> nn.Module:
    """Freeze ``model`` except what ``settings.targets`` trains; LoRA wraps it in a peft model (init seeded)."""
    for p in model.parameters():
        p.requires_grad_(False)
    routers = router_parameters(model, adapter)
    if settings.targets in ("lora", "both"):
        from peft import LoraConfig, get_peft_model

        modules, params = lora_targets(model, adapter)
        if not modules and not params:
            raise PipelineError("recover.targets: the model has no linear layer or expert tensor to put LoRA on")
        torch.manual_seed(settings.seed)
        config = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha,
            lora_dropout=0.0,
            target_modules=modules,
            target_parameters=params or None,
            bias="none",
        )
        model = get_peft_model(model, config)
    if settings.targets in ("router", "both"):
        if not routers:
            raise PipelineError("recover.targets: the model has no MoE router to train")
        for p in routers.values():
            p.requires_grad_(True)
    return model


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train, by name (stable across runs built the same way)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def learning_rates(settings: RecoverParams) -> dict[str, float]:
    """The peak learning rates ``settings.targets`` trains with, by params key (``lr_router``, ``lr_lora``)."""
    out = {}
    if settings.targets in ("router", "both"):
        out["lr_router"] = settings.lr_router
    if settings.targets in ("lora", "both"):
        out["lr_lora"] = settings.lr_lora
    return out


def param_groups(params: dict[str, nn.Parameter], routers: dict[str, nn.Parameter], settings: RecoverParams) -> list[dict]:
    """AdamW parameter groups: the routers at ``lr_router``, everything else that trains (LoRA) at
    ``lr_lora``; empty groups left out. Each group's ``peak`` is the lr its cosine schedule starts from."""
    router_ids = {id(p) for p in routers.values()}
    groups = []
    for peak, members in (
        (settings.lr_router, [p for p in params.values() if id(p) in router_ids]),
        (settings.lr_lora, [p for p in params.values() if id(p) not in router_ids]),
    ):
        if members:
            groups.append({"params": members, "lr": peak, "peak": peak})
    return groups


def merge_student(model: nn.Module) -> nn.Module:
    """The plain transformers model: LoRA merged into the weights and the peft wrappers removed."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# -- resumable state ------------------------------------------------------------------------------
def _save_state(
    path: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, step: int,
    curve: list[dict[str, float]], key: str,
) -> None:
    tensors: dict[str, torch.Tensor] = {f"param/{n}": p.detach() for n, p in params.items()}
    for i, p in enumerate(params.values()):
        for name, value in optimizer.state.get(p, {}).items():
            tensors[f"opt/{i}/{name}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    tensors["rng/cpu"] = torch.get_rng_state()
    save_tensors(path, tensors, {"step": str(step), "curve": json.dumps(curve), "key": key})


def _load_state(
    path: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, key: str,
) -> tuple[int, list[dict[str, float]]] | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("key") != key:
        log.info("%s: left by a run with other inputs; starting over", path)
        return None
    tensors = load_tensors(path, what="recovery checkpoint")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param/{n}"].to(p.device, p.dtype))
    for i, p in enumerate(params.values()):
        state = {k.split("/", 2)[2]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt/{i}/")}
        if state:
            optimizer.state[p] = state
    torch.set_rng_state(tensors["rng/cpu"])
    return int(meta["step"]), json.loads(meta["curve"])


# -- the training loop ----------------------------------------------------------------------------
def distil(
    teacher: nn.Module,
    student: nn.Module,
    adapter: MoEAdapter,
    input_ids: torch.Tensor,
    settings: RecoverParams,
    *,
    device: torch.device | str = "cpu",
    work_dir: str | Path | None = None,
    state_key: Any = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[nn.Module, RecoveryReport]:
    """Train ``student`` (the pruned model, float32) to match ``teacher`` on ``input_ids`` ``[N, L]``
    with the ``recover.*`` ``settings`` (``settings.calibration`` only names the data).

    Returns the merged student (a plain transformers model) and the report. ``on_step(step, losses)``
    is called for every step, also those a resumed run replays from its checkpoint. ``state_key``
    names the run's inputs: a checkpoint in ``work_dir`` with another key is ignored.
    """
    started = time.time()
    if input_ids.dim() != 2 or input_ids.shape[0] < 1:
        raise PipelineError(f"recover.calibration: expected token ids [N, L] with N >= 1, got {tuple(input_ids.shape)}")
    report = RecoveryReport(settings)
    if settings.steps == 0:
        return student, report
    teacher.eval()
    torch.manual_seed(settings.seed)
    routers = router_parameters(student, adapter)
    model = prepare_student(student, adapter, settings)
    model.train()
    params = trainable(model)
    report.trainable_parameters = sum(p.numel() for p in params.values())
    optimizer = torch.optim.AdamW(param_groups(params, routers, settings), weight_decay=0.0)
    key = fingerprint({"settings": settings.model_dump(mode="json"), "inputs": state_key})
    state_path = Path(work_dir) / STATE_FILE if work_dir is not None else None
    start, curve = 0, []
    if state_path is not None and (loaded := _load_state(state_path, params, optimizer, key)) is not None:
        start, curve = loaded
        report.resumed_at = start
        log.info("recover: resuming at step %d of %d from %s", start, settings.steps, state_path)
    for i, entry in enumerate(curve):
        if on_step is not None:
            on_step(i, entry)
    for step in range(start, settings.steps):
        ids = input_ids[batch_indices(input_ids.shape[0], settings.batch_size, step, settings.seed)].to(device)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits
        logits = model(input_ids=ids).logits
        kl = distillation_loss(logits, teacher_logits, settings.temperature)
        lm = lm_loss(logits, ids) if settings.lm_loss_weight else lm_loss(logits.detach(), ids)
        loss = kl + settings.lm_loss_weight * lm if settings.lm_loss_weight else kl
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(group["peak"], step, settings.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        entry = {"kl": kl.item(), "lm": lm.item(), "loss": loss.item()}
        curve.append(entry)
        if on_step is not None:
            on_step(step, entry)
        done = step + 1
        if state_path is not None and (done % settings.checkpoint_every == 0) and done < settings.steps:
            _save_state(state_path, params, optimizer, done, curve, key)
    report.curve = curve
    report.seconds = time.time() - started
    return merge_student(model), report


# -- checkpoints ----------------------------------------------------------------------------------
def copy_checkpoint(src: str | Path, dst: str | Path) -> list[str]:
    """Copy every file of the checkpoint ``src`` into ``dst`` byte for byte (``dst`` replaced atomically)."""
    src, dst = Path(src), Path(dst)
    with atomic_dir(dst) as tmp:
        for path in sorted(src.iterdir()):
            if path.is_file():
                shutil.copyfile(path, tmp / path.name)
        files = sorted(p.name for p in tmp.iterdir())
    return files


def tensor_layout(path: str | Path) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """``file -> tensor name -> (dtype, shape)`` of every safetensors file in a checkpoint directory."""
    from safetensors import safe_open

    out: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            out[file.name] = {k: (str(fh.get_slice(k).get_dtype()), tuple(fh.get_slice(k).get_shape())) for k in fh.keys()}
    return out


def save_recovered(model: nn.Module, export_dir: str | Path, out_dir: str | Path, *, recovery: dict[str, Any]) -> list[str]:
    """Save the recovered ``model`` in the export's layout: the export's files, each safetensors shard
    holding the same tensor names (same order, dtypes, shapes and metadata) with the recovered values;
    its config plus ``recovery``; its model card plus a note. ``out_dir`` is written atomically.

    The tensors come from ``model.save_pretrained`` (so their on-disk names are transformers' own);
    a tensor the export has and the model does not save (or the reverse) is an error.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    config = read_json(export_dir / "config.json", what="exported model config")
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    model = model.to(getattr(torch, dtype))
    with atomic_dir(out_dir) as tmp:
        staging = tmp / ".staging"
        try:
            model.save_pretrained(staging, max_shard_size="1000GB")
        except ValueError as exc:
            raise PipelineError(f"cannot save the recovered checkpoint to {out_dir}: {exc}") from None
        where: dict[str, Path] = {}
        for file in staging.glob("*.safetensors"):
            with safe_open(str(file), "pt") as fh:
                where.update({k: file for k in fh.keys()})
        wanted: set[str] = set()
        for path in sorted(export_dir.iterdir()):
            if not path.is_file():
                continue
            if path.suffix != ".safetensors":
                shutil.copyfile(path, tmp / path.name)
                continue
            with safe_open(str(path), "pt") as fh:
                names, metadata = list(fh.keys()), fh.metadata()
            wanted.update(names)
            missing = [n for n in names if n not in where]
            if missing:
                raise PipelineError(f"{out_dir}: the recovered model has no tensor {missing[0]} of {path}")
            tensors = {}
            for n in names:
                with safe_open(str(where[n]), "pt") as fh:
                    tensors[n] = fh.get_tensor(n)
            save_file(tensors, str(tmp / path.name), metadata=metadata)
        extra = sorted(set(where) - wanted)
        if extra:
            raise PipelineError(f"{out_dir}: the recovered model has tensors the export lacks, e.g. {extra[0]}")
        shutil.rmtree(staging)
        (tmp / "config.json").write_text(json.dumps({**config, "recovery": recovery}, indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")
        card = tmp / "README.md"
        if card.is_file():
            note = (
                "\n## Recovery fine-tuning\n\nDistilled from the original model after pruning "
                f"(`recover` stage): {json.dumps(recovery, sort_keys=True)}\n"
            )
            card.write_text(card.read_text(encoding="utf-8") + note, encoding="utf-8")
        files = sorted(p.name for p in tmp.iterdir())
    return files


def describe(settings: RecoverParams, report: RecoveryReport) -> dict[str, Any]:
    """The ``recovery`` entry of the recovered checkpoint's config."""
    return {
        **settings.model_dump(mode="json"),
        "trainable_parameters": report.trainable_parameters,
        "kl_first": report.curve[0]["kl"] if report.curve else None,
        "kl_last": report.curve[-1]["kl"] if report.curve else None,
    }

