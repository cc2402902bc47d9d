"""Stage recover: distil the original model into the exported pruned one (recovery fine-tuning).

Reads outputs/export/model (the student), outputs/model/manifest.json (the teacher) and the
calibration set recover.calibration; writes outputs/recover/model/, a plain transformers checkpoint
with the export's layout (LoRA merged back; ``recovery`` in its config). ``recover.steps: 0`` copies
the export's files unchanged. The training curve (KL and LM loss per step) goes to MLflow; a
checkpoint every ``recover.checkpoint_every`` steps in outputs/.work/recover lets a killed run resume.
"""

from __future__ import annotations

import torch

from pipeline.calibration import load_calibration_set
from pipeline.io import remove_path
from pipeline.models import get_adapter
from pipeline.models.loading import ModelManifest, checkpoint_fingerprint, load_model
from pipeline.recovery import copy_checkpoint, describe, distil, save_recovered
from pipeline.runtime import resolve_device, resolve_dtype
from stages.common import StageContext, calibration_dir, check_exported_from, stage, stage_dir


@stage("recover")
def main(ctx: StageContext) -> None:
    p = ctx.params
    settings = p.recover
    device = resolve_device(p.runtime.device)
    dtype, trust, name = resolve_dtype(p.runtime.dtype, device), p.runtime.trust_remote_code, p.recover.calibration
    exported = stage_dir("export") / "model"
    out = ctx.out / "model"
    ctx.run.set_tags({"recover.targets": settings.targets, "recover.steps": str(settings.steps)})
    if settings.steps == 0:
        copy_checkpoint(exported, out)
        ctx.log_metrics({"steps": 0, "seconds": 0.0})
        return
    manifest = ModelManifest.load(stage_dir("model") / "manifest.json")
    check_exported_from(exported, manifest.fingerprint)
    data = load_calibration_set(calibration_dir(name), name, key="recover.calibration")
    teacher = load_model(manifest.path, dtype=dtype, device=device, trust_remote_code=trust)
    student = load_model(exported, dtype=torch.float32, device=device, trust_remote_code=trust)
    inputs = {"export": checkpoint_fingerprint(exported), "model": manifest.fingerprint,
              "calibration": data.fingerprint, "device": str(device), "dtype": str(teacher.dtype)}
    work = ctx.work_dir({"settings": settings.model_dump(mode="json"), **inputs})

    def on_step(step: int, losses: dict[str, float]) -> None:
        ctx.log_metrics({f"train/{k}": v for k, v in losses.items()}, step=step)

    merged, report = distil(teacher, student, get_adapter(student.config), data.input_ids, settings,
                            device=device, work_dir=work, state_key=inputs, on_step=on_step)
    save_recovered(merged, exported, out, recovery=describe(settings, report))
    ctx.log_metrics(report.metrics())
    ctx.run.log_artifact(out / "config.json")
    ctx.run.log_reference("model", stage_dir("recover") / "model")
    ctx.after_commit.append(lambda: remove_path(work))


if __name__ == "__main__":
    main()
