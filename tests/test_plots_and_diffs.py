"""What a person reads after two runs (docs/compare.md): every plot declared in dvc.yaml renders
with a title and axis labels, each stage logged its figures to MLflow, and `dvc params diff` /
`dvc metrics diff` / `dvc plots diff` / `dvc exp show` show the change from search.r 6 to 4."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from stages.spec import producer
from tests.project import run

pytestmark = pytest.mark.slow

EXPERIMENT = "moe-expert-pruning"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def declared_plots(project: Path) -> dict[str, dict[str, Any]]:
    """Top-level ``plots:`` entries of dvc.yaml: id (a file path or a name) -> its settings."""
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    entries = [p if isinstance(p, dict) else {p: {}} for p in spec["plots"]]
    return {next(iter(e)): next(iter(e.values())) or {} for e in entries}


def vega_titles(content: dict[str, Any]) -> tuple[str | None, set[str], set[str]]:
    """Chart title and the x / y axis titles anywhere in a Vega-Lite spec (layers included)."""
    xs: set[str] = set()
    ys: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            enc = node.get("encoding")
            if isinstance(enc, dict):
                for axis, found in (("x", xs), ("y", ys)):
                    title = (enc.get(axis) or {}).get("title")
                    if title:
                        found.add(title)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(content)
    title = content.get("title")
    return (title.get("text") if isinstance(title, dict) else title), xs, ys


def show_plots(project: Path, out: Path, *revs: str) -> dict[str, list[dict[str, Any]]]:
    """``dvc plots show`` (or ``diff`` against ``revs``) as JSON; fails on any rendering error."""
    cmd = ["dvc", "plots", "diff", *revs] if revs else ["dvc", "plots", "show"]
    proc = run(project, *cmd, "--json", "-o", str(out))
    result = json.loads(proc.stdout)
    assert not result.get("errors"), result.get("errors")
    return result["data"]


def test_every_declared_plot_renders_readably(compared_project: Path, tmp_path: Path) -> None:
    data = show_plots(compared_project, tmp_path / "plots")
    declared = declared_plots(compared_project)
    assert declared and set(declared) <= set(data), set(declared) - set(data)
    for plot_id in declared:
        for item in data[plot_id]:
            if item["type"] == "image":
                png = Path(item["url"])
                assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000, plot_id
                continue
            assert item["type"] == "vega", (plot_id, item["type"])
            content = item["content"]
            assert content["data"]["values"], f"{plot_id}: no data"
            # A readable chart names itself and its axes in words, not by the JSON field names.
            settings = declared[plot_id]
            title, xs, ys = vega_titles(content)
            assert title == settings.get("title", plot_id), f"{plot_id}: title {title!r}"
            assert settings.get("x_label") in xs and settings.get("y_label") in ys, f"{plot_id}: axes x={xs} y={ys}"


def test_stages_log_their_figures_to_mlflow(compared_project: Path) -> None:
    """Each PNG in dvc.yaml's plots is an artifact `plots/<name>` of the latest run of its stage,
    byte for byte what the workspace holds."""
    client = MlflowClient(f"sqlite:///{compared_project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    pngs = [p for p in declared_plots(compared_project) if p.endswith(".png")]
    assert {"model", "search", "benchmark"} <= {p.split("/")[1] for p in pngs}
    for png in pngs:
        stage = producer(png, compared_project)  # the stage whose dvc.yaml outs hold the figure
        assert stage is not None, png
        latest = client.search_runs(
            [exp.experiment_id], f"attributes.run_name = '{stage}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )[0]
        name = Path(png).name
        listed = {a.path for a in client.list_artifacts(latest.info.run_id, "plots")}
        assert f"plots/{name}" in listed, (stage, sorted(listed))
        local = Path(client.download_artifacts(latest.info.run_id, f"plots/{name}"))
        assert local.read_bytes() == (compared_project / png).read_bytes(), png


def test_dvc_diffs_show_the_changed_param_and_its_effects(compared_project: Path, tmp_path: Path) -> None:
    p = compared_project  # git tags r6 and r4: the commits of the two runs
    params = json.loads(run(p, "dvc", "params", "diff", "r6", "r4", "--json").stdout)
    assert params == {"params.yaml": {"search.r": {"old": 6, "new": 4, "diff": -2}}}

    metrics = json.loads(run(p, "dvc", "metrics", "diff", "r6", "r4", "--json").stdout)
    bench = metrics["outputs/benchmark/metrics.json"]
    weight = bench["variants.pruned.weight_bytes"]
    assert weight["new"] < weight["old"]  # 4 experts per layer weigh less than 6
    export = metrics["outputs/export/metrics.json"]
    assert export["params_after"]["new"] < export["params_after"]["old"]
    # Stages upstream of the change did not rerun: their metrics are unchanged, so not in the diff.
    assert "outputs/model/metrics.json" not in metrics and "outputs/corpus/metrics.json" not in metrics
    assert not [path for path in metrics if path.startswith("outputs/calibration/")], sorted(metrics)
    everything = json.loads(run(p, "dvc", "metrics", "diff", "r6", "r4", "--all", "--json").stdout)
    assert "variants.pruned.average_accuracy" in everything["outputs/benchmark/metrics.json"]

    data = show_plots(p, tmp_path / "diff", "r6", "r4")
    revs = {row["rev"] for row in data["search_loss_by_layer"][0]["content"]["data"]["values"]}
    assert revs == {"r6", "r4"}, revs

    # The experiment `dvc exp run -S search.r=4` made, listed on its baseline commit (r6).
    shown = json.loads(run(p, "dvc", "exp", "show", "--json", "-A").stdout)
    baseline = run(p, "git", "rev-parse", "r6").stdout.strip()
    exps = [x for e in shown if e["rev"] == baseline for x in e.get("experiments") or []]
    assert exps, [e["rev"] for e in shown]
    data = exps[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["search"]["r"] == 4
    assert "outputs/benchmark/metrics.json" in data["metrics"]
