"""The stage declarations in dvc.yaml, the params view and the checks that keep them exact.

The end-to-end checks on a real `dvc repro` are in tests/test_pipeline_e2e.py; here each check is
shown to fail on a drift put in on purpose, and the declarations are checked against the schema.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline.config import Params, load_params
from pipeline.params_view import RESULT_NEUTRAL, ParamsView, UndeclaredParam, covering, declared_values
from stages import spec as specs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params() -> Params:
    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def stages() -> dict[str, specs.StageSpec]:
    return specs.all_specs(ROOT)


# -- the view --------------------------------------------------------------------------------------
def test_view_returns_declared_values_and_records_the_declared_key(params: Params) -> None:
    view = ParamsView(params, ["search", "runtime.device", "calibration.sets.arith"], stage="s")
    assert view.search.r == params.search.r
    assert view.search.evolutionary.budget == params.search.evolutionary.budget
    assert view.runtime.device == params.runtime.device
    assert view.calibration.sets["arith"] == params.calibration.sets["arith"]
    assert view.reads == {"search", "runtime.device", "calibration.sets.arith"}


@pytest.mark.parametrize(
    "read",
    [
        lambda v: v.search.r,  # nothing under search declared
        lambda v: v.runtime.dtype,  # a sibling of a declared key
        lambda v: v.calibration.sets["general"],  # another set than the declared one
        lambda v: v.calibration.seed,
    ],
)
def test_view_refuses_undeclared_keys_with_one_line(params: Params, read) -> None:
    view = ParamsView(params, ["runtime.device", "calibration.sets.arith"], stage="search")
    with pytest.raises(UndeclaredParam) as exc:
        read(view)
    message = str(exc.value)
    assert "\n" not in message and "stage 'search'" in message and "dvc.yaml" in message


def test_result_neutral_settings_are_readable_undeclared_and_not_recorded(params: Params) -> None:
    view = ParamsView(params, ["search"], stage="s")
    assert view.runtime.threads == params.runtime.threads
    assert view.tracking.enabled == params.tracking.enabled
    assert view.reads == set()


def test_result_neutral_keys_exist_and_no_stage_declares_them(params: Params, stages) -> None:
    declared_values(params, RESULT_NEUTRAL)  # raises on a key the schema does not have
    assert all(reason.strip() for reason in RESULT_NEUTRAL.values())
    for name, st in stages.items():
        for key in st.params:
            assert covering(key, RESULT_NEUTRAL) is None, (name, key)
            assert not any(n.startswith(key + ".") for n in RESULT_NEUTRAL), (name, key)


# -- dvc.yaml ---------------------------------------------------------------------------------------
def test_every_declared_param_exists_and_every_stage_writes_one_run_record(params: Params, stages) -> None:
    assert {"corpus", "model", "activations", "search", "export", "recover", "skip_calibration", "benchmark"} <= set(stages)
    assert {f"calibration@{name}" for name in params.calibration.sets} <= set(stages)
    folders = set()
    for name, st in stages.items():
        declared_values(params, st.params)  # every declared key names a real setting
        folders.add(st.out_dir)
        assert st.cmd.startswith(f"python -m stages.{name.split('@')[0]}"), name
        assert f"{st.out_dir.as_posix()}/{specs.RUN_RECORD}" not in st.cached_outs, name
        assert all(out.startswith(st.out_dir.as_posix() + "/") for out in st.outs), name
    assert len(folders) == len(stages)  # one output folder per stage


def test_upstream_follows_the_deps(stages) -> None:
    assert specs.upstream("corpus", ROOT) == ()
    assert specs.upstream("search", ROOT) == ("model", "calibration@general", "activations")
    assert specs.upstream("benchmark", ROOT) == ("corpus", "model", "search", "export", "recover", "skip_calibration")
    assert specs.upstream("recover", ROOT) == ("model", "calibration@general", "export")


def test_each_calibration_set_is_its_own_stage_with_its_own_params(stages) -> None:
    arith = stages["calibration@arith"]
    assert "calibration.sets.arith" in arith.params and "calibration.sets.general" not in arith.params
    assert arith.out_dir == Path("outputs/calibration/arith")
    assert not any("calibration/arith" in dep for dep in stages["search"].deps)  # search.calibration is general


def test_no_cached_output_of_the_benchmark(stages) -> None:
    """Measured speed is noise: nothing the benchmark writes may be cached (it would change on every rerun)."""
    assert stages["benchmark"].cached_outs == ()


# -- the drift checks fail on drifts put in on purpose ---------------------------------------------
def test_code_check_names_a_module_whose_dep_was_removed(stages) -> None:
    search = stages["search"]
    imported = ["stages/search.py", "pipeline/runtime.py", "pipeline/search/scoring.py", "pipeline/models/base.py"]
    assert specs.undeclared_code(imported, search) == []
    drifted = dataclasses.replace(search, deps=tuple(d for d in search.deps if d != "pipeline/runtime.py"))
    assert specs.undeclared_code(imported, drifted) == ["pipeline/runtime.py"]
    no_package = dataclasses.replace(search, deps=tuple(d for d in search.deps if d != "pipeline/search"))
    assert specs.undeclared_code(imported, no_package) == ["pipeline/search/scoring.py"]


def test_params_check_names_over_and_under_declared_keys(stages) -> None:
    search = stages["search"]
    assert specs.params_drift(set(search.params), search) == {"declared_not_read": [], "read_not_declared": []}
    assert specs.params_drift(set(search.params) - {"runtime.dtype"}, search)["declared_not_read"] == ["runtime.dtype"]
    assert specs.params_drift({*search.params, "skip.quantile"}, search)["read_not_declared"] == ["skip.quantile"]


def test_a_stage_reading_an_undeclared_key_stops_with_one_line(tmp_path: Path) -> None:
    """The real harness, on a dvc.yaml whose model entry lost a key the stage reads: one line, nothing written."""
    from tests.project import run_stage, stage_dir_project, write_run_records

    project = stage_dir_project(tmp_path / "p", {"tracking": {"enabled": False}})
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    dvc_yaml["stages"]["model"]["params"].remove("runtime.trust_remote_code")
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    write_run_records(project, "corpus")
    done = run_stage(project, "model")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert errors == [
        "error: model: runtime.trust_remote_code: stage 'model' reads this param but dvc.yaml does not declare it "
        "in the stage's params (add it there, or to pipeline.params_view.RESULT_NEUTRAL with a reason)"
    ]
    assert not (project / "outputs" / "model").exists()


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md"])
def test_diagram_is_dvc_dag(doc: str) -> None:
    """The mermaid diagram in the docs has exactly the edges `dvc dag` derives from dvc.yaml."""
    import re
    import subprocess
    import sys

    block = (ROOT / doc).read_text().split("```mermaid", 1)[1].split("```", 1)[0]
    shown = set(re.findall(r"^\s*(\S+) --> (\S+)$", block, flags=re.M))
    out = subprocess.run([Path(sys.executable).parent / "dvc", "dag", "--mermaid"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    names = dict(re.findall(r'^\s*(node\d+)\["([^"]+)"\]$', out, flags=re.M))
    dag = {(names[a], names[b]) for a, b in re.findall(r"^\s*(node\d+)-->(node\d+)$", out, flags=re.M)}
    assert dag and shown == dag


def test_ci_runs_exactly_the_readme_commands_in_order() -> None:
    """CI checks what a newcomer does: the README's opening commands, in its order, and nothing else."""
    import re

    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    readme_cmds = [line.split("#", 1)[0].strip() for line in first_block.splitlines() if line.split("#", 1)[0].strip()]
    ci = (ROOT / ".ci" / "run").read_text()
    ci_cmds = [line.strip() for line in ci.splitlines()
               if line.strip() and not line.lstrip().startswith("#") and not re.match(r"(set |cd |#!)", line.strip())]
    assert readme_cmds == ["make repro", "make test"]
    assert ci_cmds == readme_cmds
