"""End to end: a real `dvc repro` of the whole pipeline in a temporary copy of the repository.

Tiny params override (tests/project.py), real git, DVC, MLflow (SQLite store) and lm-eval.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from stages import spec as specs
from tests.project import ROOT, clone_project, read_params, run, set_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(reproduced_project: Path, tmp_path_factory) -> Path:
    """This module's own clone of the session's tiny project after `dvc repro`, committed (conftest.py)."""
    return clone_project(reproduced_project, tmp_path_factory.mktemp("e2e") / "proj")


@pytest.fixture(scope="module")
def stages(project: Path) -> dict[str, specs.StageSpec]:
    return specs.all_specs(project)


def _runs(project: Path) -> list:
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(read_params(project)["tracking"]["experiment"])
    return client.search_runs([exp.experiment_id], max_results=500)


def test_every_stage_ran_and_pipeline_is_up_to_date(project, stages):
    status = run(project, "dvc", "status").stdout
    assert "up to date" in status, status
    for name, st in stages.items():
        record = json.loads((project / st.out_dir / specs.RUN_RECORD).read_text())
        assert record["stage"] == name and record["run_id"]


def test_one_mlflow_run_per_stage_with_lineage(project, stages):
    runs = [r for r in _runs(project) if "mlflow.parentRunId" not in r.data.tags]
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert sorted(by_stage) == sorted(stages)
    assert len(runs) == len(stages)
    commit = run(project, "git", "rev-parse", "HEAD~1").stdout.strip()  # the commit the stages ran on
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    for stage, r in by_stage.items():
        tags = r.data.tags
        assert r.info.status == "FINISHED"
        assert tags["git.commit"] == commit
        assert tags["git.dirty"] == "False"
        # DVC hashes of outs as dvc.lock recorded them
        for out in lock[stage]["outs"]:
            assert tags[f"dvc.out.{out['path']}"] == out["md5"], (stage, out["path"])
        # deps hashes: upstream outputs as dvc.lock recorded them
        for dep in lock[stage]["deps"]:
            if dep["path"].startswith("outputs/"):
                assert tags[f"dvc.dep.{dep['path']}"] == dep["md5"], (stage, dep["path"])
        ups = specs.upstream(stage, project)
        assert ups or stage == "corpus"
        for up in ups:
            assert tags[f"upstream.{up.replace('@', '/')}.run_id"] == by_stage[up].info.run_id, (stage, up)


def test_benchmark_has_four_variant_child_runs_with_upstream_settings(project):
    runs = _runs(project)
    parent = next(r for r in runs if r.data.tags.get("stage") == "benchmark" and "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["variant"] for r in children) == ["original", "original_skip", "pruned", "pruned_skip"]
    r_param = str(read_params(project)["search"]["r"])
    for child in children:
        assert "average_accuracy" in child.data.metrics
        if child.data.tags["variant"].startswith("pruned"):  # the settings that produced the pruned model
            assert child.data.params["search.r"] == r_param
        else:
            assert "search.r" not in child.data.params
    report = (project / "outputs" / "benchmark" / "report.md").read_text()
    for variant in ("original", "original_skip", "pruned", "pruned_skip"):
        assert f"| {variant} |" in report


def test_exported_checkpoint_loads_with_plain_transformers(project):
    from transformers import AutoModelForCausalLM

    r = read_params(project)["search"]["r"]
    model = AutoModelForCausalLM.from_pretrained(project / "outputs" / "export" / "model")
    assert model.config.num_local_experts == r
    selection = json.loads((project / "outputs" / "search" / "selection.json").read_text())
    assert model.config.kept_experts == {str(layer["layer"]): layer["kept"] for layer in selection["layers"]}
    skip = AutoModelForCausalLM.from_pretrained(project / "outputs" / "skip" / "model")
    assert set(skip.config.expert_skip_thresholds) == set(model.config.kept_experts)


#: What the lm-eval CLI must reproduce per kind of embedded task.
CLI_METRICS = {"mc": ("acc,none", "acc_norm,none"), "ppl": ("bits_per_byte,none", "word_perplexity,none")}


def test_lm_eval_cli_on_the_exported_checkpoint_gets_the_benchmarks_results(project):
    """The README's `lm_eval` command (corpus stage's task files, exported checkpoint) reproduces the `pruned` row."""
    bench = read_params(project)["benchmark"]
    ran = json.loads((project / "outputs" / "benchmark" / "results" / "pruned.json").read_text())
    setup = json.loads((project / "outputs" / "benchmark" / "results" / "speed.json").read_text())["settings"]
    out = project.parent / "lm_eval_cli"
    run(project, sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained=outputs/export/model,dtype={setup['dtype']},"
        f"experts_implementation={setup['experts_implementation']}",
        "--include_path", "outputs/corpus/eval", "--tasks", "embedded", "--device", setup["device"],
        "--limit", str(bench["limit"]), "--batch_size", str(bench["batch_size"]), "--output_path", str(out))
    (result_file,) = out.rglob("results_*.json")
    cli = json.loads(result_file.read_text())
    domains = read_params(project)["corpus"]["domains"]
    tasks = sorted(f"embedded_{d}_{kind}" for d in domains for kind in ("mc", "ppl"))
    assert sorted(t for t in ran["results"] if t.startswith("embedded_")) == tasks
    for task in tasks:
        assert cli["n-samples"][task] == ran["n-samples"][task], task
        assert cli["configs"][task]["dataset_kwargs"] == ran["configs"][task]["dataset_kwargs"], task
        for metric in CLI_METRICS[task.rsplit("_", 1)[1]]:
            assert cli["results"][task][metric] == pytest.approx(ran["results"][task][metric], rel=1e-9), (task, metric)


def test_second_repro_is_a_fast_noop(project):
    began = time.time()
    out = run(project, "dvc", "repro").stdout
    assert "Data and pipelines are up to date" in out
    assert time.time() - began < 60


def test_skip_quantile_change_reruns_only_skip_and_benchmark(project):
    params = read_params(project)
    params["skip"]["quantile"] = 0.3
    set_params(project, params)
    try:
        status = json.loads(run(project, "dvc", "status", "--json").stdout)
        assert sorted(status) == ["skip_calibration"], status  # the only stage whose own deps changed
        dry = run(project, "dvc", "repro", "--dry").stdout
        assert _ran(dry)[0] == "skip_calibration" and "corpus" not in _ran(dry), dry
        out = run(project, "dvc", "repro").stdout
        assert _ran(out) == ["skip_calibration", "benchmark"], out
    finally:
        # back to the committed params, dvc.lock and git-tracked outputs (run.json, metrics.json), then
        # DVC-cached outputs from the cache. From HEAD, not the index: core.autostage staged dvc.lock.
        run(project, "git", "reset", "-q", "--hard", "HEAD")
        run(project, "dvc", "checkout", "--force")
    assert "up to date" in run(project, "dvc", "status").stdout


def test_each_stage_imports_only_code_it_depends_on(reproduced_project, stages):
    """(a) The project modules each stage process imported under `dvc repro` lie under its dvc.yaml deps."""
    traced = {json.loads(p.read_text())["stage"]: json.loads(p.read_text())["modules"]
              for p in (reproduced_project.parent / "imports").glob("*.json")}
    assert sorted(traced) == sorted(stages)
    for name, modules in traced.items():
        assert f"stages/{name.split('@')[0]}.py" in modules and "pipeline/runtime.py" in modules, name
        assert specs.undeclared_code(modules, stages[name]) == [], name


def test_each_stage_reads_exactly_the_params_it_declares(project, stages):
    """(b) The keys each stage read through the params view equal its dvc.yaml params (and dvc.lock's)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    for name, st in stages.items():
        read = set(json.loads((project / st.out_dir / specs.RUN_RECORD).read_text())["params_read"])
        assert specs.params_drift(read, st) == {"declared_not_read": [], "read_not_declared": []}, name
        assert set(lock[name].get("params", {}).get("params.yaml", {})) == set(st.params), name


def _cached_files(project: Path, stages) -> list[Path]:
    files: list[Path] = []
    for st in stages.values():
        for out in st.cached_outs:
            path = project / out
            files += [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path]
    return [f for f in files if f.name != ".gitignore"]


def test_nothing_cached_holds_run_ids_hosts_dates_or_paths(project, reproduced_project, stages):
    run_ids = {r.info.run_id for r in _runs(project)}
    assert len(run_ids) >= len(stages)
    # the folder the stages ran in, and this clone of it
    text_markers = [socket.gethostname(), time.strftime("%Y-%m-%d"), str(reproduced_project), str(project)]
    offenders = []
    for path in _cached_files(project, stages):
        data = path.read_bytes()
        if any(run_id.encode() in data for run_id in run_ids):
            offenders.append((path, "run id"))
        if path.suffix in (".json", ".jsonl", ".md", ".csv", ".txt", ".yaml") and path.stat().st_size < 5 << 20:
            text = data.decode("utf-8", errors="replace")
            offenders += [(path, marker) for marker in text_markers if marker in text]
    assert offenders == []


def _what_reruns_when() -> list[tuple[str, list[str]]]:
    """The table in docs/wiring.md: (edit, stages dvc status reports)."""
    doc = (ROOT / "docs" / "wiring.md").read_text()
    section = doc.split("## What reruns when", 1)[1]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \|$", section, flags=re.M)
    return [(edit, [] if stale.strip() == "(none)" else [s.strip() for s in stale.split(",")]) for edit, stale in rows]


def _apply(project: Path, edit: str) -> None:
    verb, _, rest = edit.partition(" ")
    if verb == "set":
        key, _, value = rest.partition(" ")
        params = read_params(project)
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        assert leaf in node, key
        node[leaf] = yaml.safe_load(value)
        set_params(project, params)
    elif verb == "comment":
        with open(project / rest, "a") as fh:
            fh.write("# a comment changes no value\n")
    elif verb == "edit":
        with open(project / rest, "a") as fh:
            fh.write("\n# an edit of the code\n")
    else:
        raise AssertionError(f"unknown edit {edit!r} in docs/wiring.md")


def test_what_reruns_when(project):
    """Every row of docs/wiring.md's table: one edit, then exactly those stages are stale."""
    table = _what_reruns_when()
    assert len(table) >= 12
    sections = {e.split()[1].split(".")[0] for e, _ in table if e.startswith("set ")}
    assert sections >= {"tracking", "runtime", "corpus", "model", "calibration", "activations", "search", "export",
                        "skip", "benchmark"}
    wrong = []
    for edit, expected in table:
        _apply(project, edit)
        try:
            stale = sorted(json.loads(run(project, "dvc", "status", "--json").stdout))
        finally:
            run(project, "git", "checkout", "-q", "HEAD", "--", ".")
        if stale != sorted(expected):
            wrong.append((edit, stale))
    assert wrong == []
    assert "up to date" in run(project, "dvc", "status").stdout


def test_forced_rerun_of_any_stage_leaves_everything_up_to_date(reproduced_project, forced_project, stages):
    """Every stage rerun with unchanged inputs (`dvc repro -f`, in a clone of the project: another
    folder) writes the same bytes: its dvc.lock entry (the hashes of its deps and of its cached outs)
    is unchanged, so `dvc repro -f -s <stage>` of any one leaves every stage up to date. One
    `dvc repro -f` runs each stage once, as `-f -s` would, without a DVC start-up per stage; it ran
    beside the other tests (conftest.py)."""
    out = (forced_project.parent / "repro.log").read_text()
    assert sorted(_ran(out)) == sorted(stages), out
    before = _lock_hashes((reproduced_project / "dvc.lock").read_text(), stages)
    after = _lock_hashes((forced_project / "dvc.lock").read_text(), stages)
    not_exact = {name: sorted(path for path in before[name] if after[name].get(path) != before[name][path])
                 for name in stages}
    assert {name: paths for name, paths in not_exact.items() if paths} == {}
    assert after == before
    assert json.loads(run(forced_project, "dvc", "status", "--json").stdout) == {}


def _lock_hashes(lock_text: str, stages) -> dict[str, dict[str, str]]:
    """``stage -> {path: md5}`` of each stage's deps and cached outs in dvc.lock."""
    lock = yaml.safe_load(lock_text)["stages"]
    hashes = {}
    for name, st in stages.items():
        entries = lock[name].get("deps", []) + [o for o in lock[name].get("outs", []) if o["path"] in st.cached_outs]
        hashes[name] = {entry["path"]: entry["md5"] for entry in entries}
    return hashes


def _ran(log: str) -> list[str]:
    return [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")]
