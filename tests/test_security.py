"""Security defaults: no unpickling, remote code off unless asked (with a warning), UI on loopback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import load_params
from tests.project import run_stage, stage_dir_project

REPO = Path(__file__).resolve().parents[1]
#: Calls that unpickle (run arbitrary code from a file) and must not appear in our code.
UNPICKLING = re.compile(r"\btorch\.load\(|\bpickle\.loads?\(|\bjoblib\.load\(|weights_only\s*=\s*False|\bnp\.load\([^)]*allow_pickle\s*=\s*True")


def test_no_code_path_unpickles_a_file() -> None:
    for bad in ("sd = torch.load(path)", "pickle.load(fh)", "torch.load(p, weights_only=False)"):
        assert UNPICKLING.search(bad), bad
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for folder in ("pipeline", "stages", "bench", "scripts")
        for path in sorted((REPO / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if UNPICKLING.search(line)
    ]
    assert not offenders, offenders


def test_defaults_keep_remote_code_off_and_the_ui_on_loopback() -> None:
    assert load_params(REPO / "params.yaml").runtime.trust_remote_code is False
    assert re.search(r"^HOST \?= 127\.0\.0\.1$", (REPO / "Makefile").read_text(), re.M)


@pytest.mark.slow
def test_trust_remote_code_warns(tmp_path: Path) -> None:
    project = stage_dir_project(tmp_path, {
        "runtime": {"trust_remote_code": True},
        "tracking": {"enabled": False},
        "corpus": {"max_chars_per_domain": 20_000, "doc_chars": 400, "test_fraction": 0.15,
                   "eval": {"mc_items_per_domain": 4, "ppl_docs_per_domain": 2}},
    })
    proc = run_stage(project, "corpus")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "runtime.trust_remote_code is true: transformers may run code from the model's repository" in proc.stderr
