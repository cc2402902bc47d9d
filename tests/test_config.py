"""params.yaml validation: the shipped file is valid; bad values stop with one line naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.config import flatten, load_params, schema_reference, validate
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.search.calibration in params.calibration.sets
    assert params.model.source == "embedded"


def test_every_schema_key_is_in_params_yaml(raw):
    """params.yaml documents every key the schema knows (except per-set keys under calibration.sets)."""
    flat = flatten(raw)
    for key, kind, _default, _doc in schema_reference():
        if kind == "section" or key.startswith("calibration.sets"):
            continue
        assert any(k == key or k.startswith(key + ".") for k in flat) or key in flat, f"{key} missing in params.yaml"


def test_params_yaml_shows_the_schema_defaults(raw):
    """The schema declares each default once; params.yaml shows the same values (no second declaration)."""
    flat = flatten(raw)
    drift = [
        f"{key}: params.yaml {flat[key]!r}, schema {default}"
        for key, kind, default, _doc in schema_reference()
        if kind != "section" and not key.startswith("calibration.sets") and key in flat and repr(flat[key]) != default
    ]
    assert not drift, "; ".join(drift)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("search", "r"), "six", "search.r"),
        (("search", "r"), 0, "search.r"),
        (("search", "r"), 8, "search.r: must be below the model's 8 experts"),
        (("search", "r"), 1, "search.r: must be at least the model's top_k=2"),
        (("search", "strategy"), "enumerat", "search.strategy"),
        (("search", "calibration"), "nope", "search.calibration: calibration set 'nope' does not exist"),
        (("search", "typo_key"), 1, "search.typo_key: unknown key"),
        (("corpus", "seed"), -1, "corpus.seed"),
        (("skip", "quantile"), 1.5, "skip.quantile"),
        (("runtime", "device"), "tpu", "runtime.device"),
        (("calibration", "sets", "general", "num_samples"), 0, "calibration.sets.general.num_samples"),
        (("calibration", "sets", "general", "seq_len"), 4096, "calibration.sets.general.seq_len: 4096 exceeds"),
        (("recover", "targets"), "experts", "recover.targets"),
        (("recover", "steps"), -1, "recover.steps"),
        (("recover", "temperature"), 0.0, "recover.temperature"),
        (("recover", "lora_rank"), 0, "recover.lora_rank"),
        (("recover", "lr_router"), 1.0, "recover.lr_router: Input should be less than 1"),
        (("recover", "lr_lora"), -3e-4, "recover.lr_lora: Input should be greater than 0"),
        (("recover", "calibration"), "nope", "recover.calibration: calibration set 'nope' does not exist"),
    ],
)
def test_bad_values_name_the_key(raw, path, value, expected):
    bad = copy.deepcopy(raw)
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(PipelineError) as err:
        validate(bad)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_calibration_source_errors_name_the_list_position(raw):
    bad = copy.deepcopy(raw)
    bad["calibration"]["sets"]["general"]["sources"][0]["type"] = "ftp"
    with pytest.raises(PipelineError, match=r"calibration\.sets\.general\.sources\[0\]"):
        validate(bad)


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("search:\n  r: [6\n")
    with pytest.raises(PipelineError, match=r"is not valid YAML at line \d+"):
        load_params(path)


def test_missing_params_file(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")


def test_flatten_dotted_keys(raw):
    flat = flatten(load_params(ROOT / "params.yaml"))
    assert flat["search.r"] == raw["search"]["r"]
    assert flat["model.embedded.train.seed"] == raw["model"]["embedded"]["train"]["seed"]


def test_params_reference_doc_is_up_to_date():
    """docs/params.md is generated from the schema; regenerate with scripts/params_doc.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("params_doc", ROOT / "scripts" / "params_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "params.md").read_text() == module.render(), "run: python scripts/params_doc.py > docs/params.md"


def test_schema_imports_without_torch():
    """The schema (and the strategy registry it reads) loads without torch, so validation stays fast."""
    import subprocess
    import sys

    code = "import sys, pipeline.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
