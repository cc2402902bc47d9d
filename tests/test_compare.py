"""The comparison grid (`make compare`): grid file checks, the summary's statistics, and one real
two-point grid run as DVC experiments on the tiny project."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import compare
from pipeline.errors import PipelineError
from pipeline.evaluate import stats
from pipeline.evaluate.lmeval import ItemScores
from pipeline.evaluate.report import VariantResult
from tests.project import ROOT, clone_project, run

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def write_grid(path: Path, **doc: object) -> Path:
    base = {"strategies": ["frequency", "random"], "r": [4], "calibration": ["general"], "overrides": {}}
    path.write_text(yaml.safe_dump({**base, **doc}))
    return path


def test_the_shipped_grid_is_the_issue_grid() -> None:
    grid = compare.load_grid(ROOT / "compare.yaml", PARAMS)
    assert len(grid.points) == 7 * 3 * 2
    assert {p.strategy for p in grid.points} == {"enumerate", "beam", "greedy", "evolutionary", "frequency", "random", "reap"}
    assert len({p.name for p in grid.points}) == len(grid.points)
    # the file's first r comes first, with every set and strategy: a grid cut short is still a comparison
    assert [p.r for p in grid.points[:14]] == [4] * 14
    assert {p.calibration for p in grid.points[:14]} == {"general", "arith"}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"strategies": ["exhaustive"]}, "strategies: unknown strategy 'exhaustive'"),
        ({"calibration": ["c4"]}, "calibration: no set 'c4'"),
        ({"r": [8]}, "search.r"),
        ({"r": ["4"]}, "r: expected a non-empty list of int"),
        ({"overrides": {"search.nope": 1}}, "search.nope: not a key of params.yaml"),
        ({"overrides": {"benchmark.speed.repeats": 0}}, "benchmark.speed.repeats"),
        ({"budget": 3}, "unknown key 'budget'"),
    ],
)
def test_a_bad_grid_file_gets_one_line_naming_the_key(tmp_path: Path, doc: dict, message: str) -> None:
    with pytest.raises(PipelineError) as err:
        compare.load_grid(write_grid(tmp_path / "grid.yaml", **doc), PARAMS)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_set_args_are_dvc_set_param_pairs(tmp_path: Path) -> None:
    grid = compare.load_grid(write_grid(tmp_path / "g.yaml", overrides={"benchmark.variants": ["pruned"]}), PARAMS)
    args = grid.set_args(grid.points[0])
    assert args == ["-S", "benchmark.variants=[pruned]", "-S", "search.strategy=frequency", "-S", "search.r=4",
                    "-S", "search.calibration=general"]


def _variant(name: str, acc: np.ndarray, ll: np.ndarray, nbytes: np.ndarray) -> VariantResult:
    words = np.full(len(ll), 10)
    tasks = {
        "embedded_arith_mc": {"acc": float(acc.mean())},
        "embedded_arith_ppl": {"bits_per_byte": float(stats.corpus_metric("bits_per_byte", ll, nbytes)),
                               "word_perplexity": float(stats.corpus_metric("word_perplexity", ll, words))},
    }
    items = {
        "embedded_arith_mc": ItemScores([str(i) for i in range(len(acc))], {"acc": acc.tolist()}),
        "embedded_arith_ppl": ItemScores([str(i) for i in range(len(ll))], loglikelihood=ll.tolist(),
                                         words=words.tolist(), bytes=nbytes.tolist()),
    }
    return VariantResult(name=name, tasks=tasks, weight_bytes=1, items=items)


def _run(point: compare.GridPoint, v: VariantResult, loss: float) -> dict:
    from pipeline.evaluate.report import build_metrics

    metrics = build_metrics([v])
    items = {"tasks": {t: s.to_json() for t, s in v.items.items()}}
    search = {"loss": loss, "layers": {"0": {"loss": loss}}, "baselines": {}, "seconds": 1.0}
    return compare.run_record(point, search, metrics, items, {"search": "abc"})


def test_summary_pairs_runs_with_the_original_and_ranks_loss_against_quality() -> None:
    rng = np.random.default_rng(0)
    n = 120
    nbytes = rng.integers(200, 400, n)
    base_ll = -nbytes * rng.uniform(1.2, 1.6, n)
    acc = (rng.random(n) < 0.6).astype(float)
    original = _variant("original", acc, base_ll, nbytes)
    runs = []
    # a larger search loss, a larger downstream loss: rho must come out +1 for bits per byte
    for i, strategy in enumerate(["enumerate", "beam", "greedy", "random"]):
        worse = base_ll - nbytes * 0.05 * i
        runs.append(_run(compare.GridPoint(strategy, 4, "general"), _variant("pruned", acc, worse, nbytes), 100.0 + i))
    summary = compare.summarise(original, runs)
    rows = {r["strategy"]: r for r in summary["rows"]}
    assert rows["enumerate"]["bits_per_byte_vs_original"]["arith"]["verdict"] == "within noise"
    assert rows["random"]["bits_per_byte_vs_original"]["arith"]["verdict"] == "worse"
    assert summary["spearman"]["general"]["mean_bits_per_byte"]["rho"] == pytest.approx(1.0)
    versus = {c["strategy"]: c for c in summary["versus_best"]["comparisons"]}
    assert set(versus) == {"beam", "greedy", "random"}
    assert versus["random"]["bits_per_byte"]["arith"]["verdict"] == "worse"
    assert versus["random"]["bits_per_byte"]["arith"]["difference"] == pytest.approx(
        rows["random"]["bits_per_byte"]["arith"] - rows["enumerate"]["bits_per_byte"]["arith"])
    text = compare.render_markdown(summary)
    assert "enumerate r=4 general" in text and "Spearman" in text


def test_skipping_claim_counts_the_later_expert_evaluations_removed() -> None:
    metrics = {"variants": {"original": {"expert_evals_per_token": 2.0},
                            "original_skip": {"expert_evals_per_token": 1.4, "vs_original": None}}}
    claim = compare.skipping_claim(metrics)
    assert claim["original_skip"]["removed_share_of_later_experts"] == pytest.approx(0.6)


@pytest.mark.slow
def test_make_compare_runs_each_point_as_a_dvc_experiment_and_restores_the_workspace(
    reproduced_project: Path, tmp_path: Path
) -> None:
    project = clone_project(reproduced_project, tmp_path / "proj")
    grid = write_grid(project / "grid.yaml", overrides={"benchmark.variants": ["pruned"]})
    before = {p: (project / p).read_bytes() for p in ("params.yaml", "dvc.lock", "outputs/search/selection.json",
                                                      "outputs/benchmark/metrics.json")}
    run(project, sys.executable, "scripts/compare.py", "--grid", str(grid), timeout=1200)  # fails on a non-zero exit

    summary = json.loads((project / "outputs/compare/summary.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["cmp-frequency-r4-general", "cmp-random-r4-general"]
    for row in summary["rows"]:
        assert math.isfinite(row["search_loss"]) and row["search_loss"] > 0
        assert row["bits_per_byte_vs_original"]["arith"]["verdict"] in {"better", "worse", "within noise"}
        assert row["mlflow_runs"]["search"] and row["mlflow_runs"]["benchmark"]
    assert (project / "outputs/compare/compare.png").stat().st_size > 10_000
    assert "| frequency r=4 general |" in (project / "outputs/compare/summary.md").read_text()

    shown = run(project, "dvc", "exp", "list", "--name-only").stdout.split()
    assert {"cmp-frequency-r4-general", "cmp-random-r4-general"} <= set(shown)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(PARAMS["tracking"]["experiment"])
    tagged = client.search_runs([exp.experiment_id], "tags.`dvc.dvc_exp_name` = 'cmp-random-r4-general'")
    assert {r.data.tags["stage"] for r in tagged} >= {"search", "export", "benchmark"}
    (summary_run,) = client.search_runs([exp.experiment_id], "tags.stage = 'compare'")
    assert summary_run.data.params["runs"] == "2"
    assert "spearman.general.mean_bits_per_byte" not in summary_run.data.metrics  # two runs: no correlation

    # the workspace is back as it was: same params, lock and outputs, nothing to reproduce
    assert {p: (project / p).read_bytes() for p in before} == before
    assert "up to date" in run(project, "dvc", "status").stdout

    again = run(project, sys.executable, "scripts/compare.py", "--grid", str(grid))
    assert "all 2 grid runs are done" in again.stderr


@pytest.mark.parametrize("domain", ["prose", "code", "arith", "data", "my_domain"])
def test_task_domain_inverts_the_task_names(domain):
    from pipeline.task_files import mc_task_name, ppl_task_name, task_domain

    assert task_domain(ppl_task_name(domain)) == domain == task_domain(mc_task_name(domain))
    assert task_domain("gsm8k") == "gsm8k"
