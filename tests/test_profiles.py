"""The README's fine-grained profile (Qwen3-MoE, 64 experts, top-4): its one documented line is valid,
keeps the model's size, and runs the whole pipeline (the slow test runs the line itself on the tiny project)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline import config as cfg
from pipeline.search import registry
from tests.project import ROOT, run

PROFILE_MARK = "model.embedded.num_experts=64"


def fine_grained_line() -> list[str]:
    """The README's fine-grained profile command, as argv (the one line naming 64 experts)."""
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines() if PROFILE_MARK in ln]
    commands = [ln for ln in lines if ln.startswith("dvc exp run ")]
    assert len(commands) == 1, f"README.md: expected one `dvc exp run` line with {PROFILE_MARK}, found {commands}"
    return shlex.split(commands[0])


def _overrides(argv: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for flag, value in zip(argv, argv[1:]):
        if flag in ("-S", "--set-param"):
            key, _, raw = value.partition("=")
            out[key] = yaml.safe_load(raw)  # DVC parses -S values as YAML too
    return out


def _apply(params: dict, overrides: dict[str, object]) -> dict:
    for key, value in overrides.items():
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        assert leaf in node, f"{key} is not a key of params.yaml"
        node[leaf] = value
    return params


def _profile_raw() -> dict:
    return _apply(yaml.safe_load((ROOT / "params.yaml").read_text()), _overrides(fine_grained_line()))


def _profile_params() -> cfg.Params:
    return cfg.validate(_profile_raw())


def test_the_documented_line_is_valid_params_and_chooses_beam_search():
    params = _profile_params()
    shape = params.model.embedded
    assert (shape.architecture, shape.num_experts, shape.top_k) == ("qwen3_moe", 64, 4)
    assert params.search.r == shape.num_experts // 2
    strategy = registry.resolve(params.search.strategy, shape.num_experts, params.search.r, params.search.enumerate_budget)
    assert strategy == "beam"


def test_the_profile_keeps_the_default_models_size_within_two_percent():
    from pipeline.train import build_config, build_model, count_parameters

    default = cfg.validate(yaml.safe_load((ROOT / "params.yaml").read_text())).model
    fine = _profile_params().model
    sizes = []
    for model in (default, fine):
        config = build_config(model.embedded, 0, model.embedded.train.router_aux_loss_coef)
        sizes.append(count_parameters(build_model(config, 0)))
    assert abs(sizes[1] / sizes[0] - 1) < 0.02, sizes


def test_the_profiles_grid_is_valid_for_the_profile():
    from pipeline import compare

    grid = compare.load_grid(ROOT / "compare-fine-grained.yaml", _profile_raw())
    assert {p.r for p in grid.points} == {32, 16} and "beam" in {p.strategy for p in grid.points}


@pytest.mark.slow
def test_the_documented_line_runs_the_whole_pipeline(fine_grained_project: Path):
    project = fine_grained_project
    status = run(project, "dvc", "status").stdout
    assert "up to date" in status, status
    model_config = json.loads((project / "outputs/model/checkpoint/config.json").read_text())
    assert model_config["model_type"] == "qwen3_moe"
    assert (model_config["num_local_experts"], model_config["num_experts_per_tok"]) == (64, 4)  # transformers 5's key
    selection = json.loads((project / "outputs/search/selection.json").read_text())
    assert (selection["strategy"], selection["r"], selection["num_experts"]) == ("beam", 32, 64)
    assert all(len(layer["kept"]) == 32 for layer in selection["layers"])
    exported = json.loads((project / "outputs/export/model/config.json").read_text())
    assert exported["num_local_experts"] == 32
    assert [sorted(k) for k in exported["kept_experts"].values()] == [sorted(layer["kept"]) for layer in selection["layers"]]
    log = (project.parent / "run.log").read_text()
    assert re.search(r"estimated", log), "the search stage printed no cost estimate"
    metrics = json.loads((project / "outputs/benchmark/metrics.json").read_text())
    assert {"original", "pruned"} <= set(metrics["variants"])
