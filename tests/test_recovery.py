"""Recovery fine-tuning (pipeline/recovery.py) on a tiny random Mixtral pruned from 8 to 4 experts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline.config import RecoverParams, section
from pipeline.errors import PipelineError
from pipeline.export import Selection, export_pruned
from pipeline.io import sha256_file
from pipeline.models import get_adapter
from pipeline.models.loading import load_model
from pipeline.recovery import (
    STATE_FILE,
    copy_checkpoint,
    distil,
    distillation_loss,
    router_parameters,
    save_recovered,
    tensor_layout,
)
from tests.factory import tiny_model, tiny_tokenizer
from tests.test_export import selection_dict

ROOT = Path(__file__).resolve().parents[1]


def settings_with(**overrides: object) -> RecoverParams:
    """The default ``recover.*`` params with ``overrides``, validated."""
    return section(RecoverParams, "recover", **overrides)


def make_pair(root: Path) -> tuple[Path, Path, torch.Tensor]:
    """(teacher checkpoint, exported pruned checkpoint, token ids [16, 24])."""
    model = tiny_model("mixtral")
    with torch.no_grad():  # sharper next-token distributions than a random init's, so the KL is far from 0
        model.lm_head.weight.mul_(40)
    teacher = root / "teacher"
    model.save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    model = load_model(teacher)
    selection = Selection.from_dict(selection_dict(model, r=4))
    export_pruned(model, get_adapter(model.config), selection, root / "export", tokenizer=tiny_tokenizer(), progress=False)
    ids = torch.randint(0, 320, (16, 24), generator=torch.Generator().manual_seed(1))
    return teacher, root / "export", ids


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.Tensor]:
    return make_pair(tmp_path_factory.mktemp("recovery"))


def run_recovery(pair, settings: RecoverParams, out: Path, work: Path | None = None):
    teacher_dir, export_dir, ids = pair
    teacher, student = load_model(teacher_dir), load_model(export_dir)
    adapter = get_adapter(student.config)
    merged, report = distil(teacher, student, adapter, ids, settings, work_dir=work, state_key="test")
    save_recovered(merged, export_dir, out, recovery={"steps": settings.steps})
    return report


def kl_of(pair, student_dir: Path, temperature: float = 2.0) -> float:
    teacher_dir, _, ids = pair
    with torch.no_grad():
        t = load_model(teacher_dir)(input_ids=ids).logits
        s = load_model(student_dir)(input_ids=ids).logits
    return float(distillation_loss(s, t, temperature))


def test_steps_zero_copies_the_export_byte_for_byte(pair, tmp_path: Path) -> None:
    _, export_dir, _ = pair
    copy_checkpoint(export_dir, tmp_path / "out")
    theirs = {p.name: sha256_file(p) for p in export_dir.iterdir()}
    assert {p.name: sha256_file(p) for p in (tmp_path / "out").iterdir()} == theirs


def test_router_only_lowers_the_kl_and_changes_only_router_tensors(pair, tmp_path: Path) -> None:
    settings = settings_with(steps=12, lr_router=5e-2, targets="router", batch_size=4, lm_loss_weight=0.01)
    report = run_recovery(pair, settings, tmp_path / "out")
    assert len(report.curve) == 12 and report.trainable_parameters == 2 * 4 * 32  # 2 layers, 4 experts, d = 32
    assert report.curve[-1]["loss"] == pytest.approx(report.curve[-1]["kl"] + 0.01 * report.curve[-1]["lm"])
    _, export_dir, _ = pair
    assert kl_of(pair, tmp_path / "out") < 0.95 * kl_of(pair, export_dir)
    before, after = load_file(export_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    student = load_model(export_dir)  # the router is `gate` in memory and on disk (its block is renamed on disk)
    routers = {name.rsplit(".", 2)[-2:][0] for name in router_parameters(student, get_adapter(student.config))}
    assert routers == {"gate"}
    assert changed == {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in (0, 1)}


def test_lora_merged_checkpoint_loads_without_peft_with_the_export_layout(pair, tmp_path: Path) -> None:
    settings = settings_with(steps=6, lr_lora=3e-4, targets="both", batch_size=4, lora_rank=4)
    report = run_recovery(pair, settings, tmp_path / "out")
    _, export_dir, _ = pair
    assert tensor_layout(tmp_path / "out") == tensor_layout(export_dir)
    assert report.curve[0]["lm"] > 0 and report.curve[-1]["loss"] == report.curve[-1]["kl"]  # LM loss logged, weight 0
    assert kl_of(pair, tmp_path / "out") < kl_of(pair, export_dir)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["peft"] = None  # importing peft fails: the checkpoint must not need it
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})
        assert m.config.recovery["steps"] == 6 and m.config.kept_experts
        print(sum(p.numel() for p in m.parameters()))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    plain = AutoModelForCausalLM.from_pretrained(export_dir)
    assert int(done.stdout.split()[-1]) == sum(p.numel() for p in plain.parameters())
    # experts and attention moved, not only the routers
    before, after = load_file(export_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("self_attn" in k for k in changed) and any("experts" in k for k in changed)


def test_both_trains_the_routers_at_lr_router_and_lora_at_lr_lora(pair, tmp_path: Path) -> None:
    """Two AdamW groups: with lr_lora near 0, ``both`` moves the routers as router-only training does
    and leaves every other tensor where it was (to float noise)."""
    common = dict(steps=4, lr_router=5e-2, batch_size=4, lora_rank=4)
    run_recovery(pair, settings_with(targets="router", **common), tmp_path / "router")
    run_recovery(pair, settings_with(targets="both", lr_lora=1e-12, **common), tmp_path / "both")
    _, export_dir, _ = pair
    before = load_file(export_dir / "model.safetensors")
    router, both = load_file(tmp_path / "router" / "model.safetensors"), load_file(tmp_path / "both" / "model.safetensors")
    gates = {k for k in before if k.endswith("gate.weight")}
    assert len(gates) == 2 and all((both[k] - before[k]).abs().max() > 1e-3 for k in gates)
    assert all(torch.allclose(both[k], router[k], atol=1e-5) for k in gates)
    assert all(torch.allclose(both[k], before[k], atol=1e-6) for k in before.keys() - gates)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("targets", "experts", r"^recover.targets: Input should be 'router', 'lora' or 'both' \(got 'experts'\)$"),
        ("steps", -1, r"^recover.steps: Input should be greater than or equal to 0 \(got -1\)$"),
        ("batch_size", 0, r"^recover.batch_size: Input should be greater than or equal to 1"),
        ("lm_loss_weight", -0.1, r"^recover.lm_loss_weight: Input should be greater than or equal to 0"),
        ("lr_lora", 0.0, r"^recover.lr_lora: Input should be greater than 0"),
        ("lr", 1e-3, r"^recover.lr: unknown key"),  # one lr per target now
    ],
)
def test_bad_settings_are_one_line_errors(field: str, value: object, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        settings_with(**{field: value})


RESUME_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from pathlib import Path
from pipeline.models import get_adapter
from pipeline.models.loading import load_model
from pipeline.config import RecoverParams, section
from pipeline.recovery import distil, save_recovered
teacher_dir, export_dir, ids_file, work, out, hang_at = sys.argv[1:]
ids = torch.load(ids_file)
settings = section(RecoverParams, "recover", steps=8, lr_router=1e-2, lr_lora=3e-4, targets="both", batch_size=4,
                   lora_rank=4, checkpoint_every=2)
teacher, student = load_model(teacher_dir), load_model(export_dir)
def on_step(step, losses):
    print("step", step, flush=True)
    if step + 1 == int(hang_at):
        time.sleep(600)  # killed here, after the checkpoint of step hang_at
merged, report = distil(teacher, student, get_adapter(student.config), ids, settings, work_dir=work,
                        state_key="resume", on_step=on_step)
save_recovered(merged, export_dir, out, recovery={"resumed_at": report.resumed_at})
print("resumed_at", report.resumed_at, "curve", len(report.curve), flush=True)
"""


@pytest.mark.slow  # three fresh Python processes: about 50 s on a busy 2-core machine
def test_kill_9_resumes_to_the_uninterrupted_result(pair, tmp_path: Path) -> None:
    teacher_dir, export_dir, ids = pair
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(work: str, out: str, hang_at: int) -> subprocess.Popen:
        args = [teacher_dir, export_dir, tmp_path / "ids.pt", tmp_path / work, tmp_path / out, hang_at]
        return subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, *map(str, args)], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    killed = start("work_killed", "killed", 5)  # hangs after step 5; the last checkpoint is step 4
    state = tmp_path / "work_killed" / STATE_FILE
    deadline = time.monotonic() + 240
    lines = []
    while True:
        line = killed.stdout.readline()
        assert line or killed.poll() is None, "".join(lines)
        lines.append(line)
        if line.strip() == "step 4":  # on_step(4) runs after the step-4 checkpoint was written
            break
        assert time.monotonic() < deadline
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL and state.is_file()
    resumed = start("work_killed", "killed", 0)
    straight = start("work_straight", "straight", 0)
    out_resumed, _ = resumed.communicate(timeout=300)
    out_straight, _ = straight.communicate(timeout=300)
    assert resumed.returncode == 0 and straight.returncode == 0, out_resumed[-2000:] + out_straight[-2000:]
    assert "resumed_at 4 curve 8" in out_resumed and "resumed_at 0 curve 8" in out_straight
    a = load_file(tmp_path / "killed" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
