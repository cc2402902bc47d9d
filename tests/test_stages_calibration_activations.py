"""The calibration and activations stages as DVC runs them: real processes, real MLflow store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline.activations import ActivationCache
from pipeline.calibration import load_calibration_set
from pipeline.io import sha256_file
from pipeline.models.loading import ModelManifest, build_manifest
from tests.factory import save_tiny_checkpoint
from tests.project import run_stage, stage_dir_project, write_run_records

pytestmark = pytest.mark.slow


def params(seq_len: int = 16, tracking: bool = True, arith_seq_len: int = 16) -> dict:
    corpus = {"type": "corpus", "domains": ["prose", "code", "arith"], "split": "train"}
    return {
        "tracking": {"enabled": tracking, "experiment": "test"},
        "runtime": {"device": "cpu", "dtype": "float32"},
        "calibration": {
            "seed": 42,
            "sets": {
                "general": {"num_samples": 6, "seq_len": seq_len, "sources": [corpus]},
                "arith": {"num_samples": 4, "seq_len": arith_seq_len, "sources": [{**corpus, "domains": ["arith"]}]},
            },
        },
        "activations": {"dtype": "float32", "batch_size": 4},
        "search": {"calibration": "arith"},
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare stage folder holding the corpus and model stages' outputs."""
    from datasets import Dataset, DatasetDict

    root = stage_dir_project(tmp_path_factory.mktemp("project"), params())
    texts = {"prose": "The fox {i} jumps over the dog.", "code": "def f{i}(x):\n    return x\n", "arith": "{i} + 2 = {j}"}
    rows = [(t.format(i=i, j=i + 2), d) for i in range(40) for d, t in texts.items()]
    ds = Dataset.from_dict({"text": [r[0] for r in rows], "domain": [r[1] for r in rows], "source": ["test"] * len(rows)})
    DatasetDict({"train": ds, "validation": ds.select(range(6)), "test": ds.select(range(6, 12))}).save_to_disk(
        str(root / "outputs/corpus/data")
    )
    checkpoint = save_tiny_checkpoint(root / "outputs/model/checkpoint", layers=3)
    build_manifest("embedded", checkpoint, None).save(root / "outputs/model/manifest.json")
    write_run_records(root, "corpus", "model")
    return root


def run(root: Path, stage: str, p: dict) -> subprocess.CompletedProcess[str]:
    """``stage`` in ``root`` with ``p`` merged into the repo's params.yaml."""
    stage_dir_project(root, p)
    return run_stage(root, stage, timeout=300, HF_DATASETS_CACHE=str(root / ".hf-datasets"))


def test_calibration_then_activations(project: Path) -> None:
    out = project / "outputs/calibration"
    for name, shape in (("general", (6, 16)), ("arith", (4, 16))):
        done = run(project, f"calibration@{name}", params())
        assert done.returncode == 0, done.stderr
        assert {"input_ids.safetensors", "manifest.json", "run.json", "metrics.json"} <= {p.name for p in (out / name).iterdir()}
        assert json.loads((out / name / "run.json").read_text())["stage"] == f"calibration@{name}"
        data = load_calibration_set(out / name, name)
        assert tuple(data.input_ids.shape) == shape and data.manifest["name"] == name
    assert sorted(p.name for p in out.iterdir()) == ["arith", "general"]  # one folder per set, nothing else
    arith = load_calibration_set(out / "arith", "arith")

    done = run(project, "activations", params())
    assert done.returncode == 0, done.stderr
    manifest = ModelManifest.load(project / "outputs/model/manifest.json")
    cache = ActivationCache(project / "outputs/activations", expected_model_fingerprint=manifest.fingerprint)
    assert cache.calibration == "arith" and cache.layers == [0, 1, 2]
    assert cache.manifest["calibration_fingerprint"] == arith.fingerprint
    assert cache.load(2).shape == (4, 16, manifest.hidden_size)
    assert not any((project / "outputs/.work/activations").iterdir())  # work dir removed after success
    metrics = json.loads((project / "outputs/activations/metrics.json").read_text())
    assert metrics["tokens_per_s"] > 0 and metrics["bytes_written"] >= metrics["cache_bytes"] > 0

    import mlflow

    run_id = json.loads((project / "outputs/activations/run.json").read_text())["run_id"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    logged = client.get_run(run_id).data
    assert logged.metrics["bytes_written"] == metrics["bytes_written"] and logged.params["search.calibration"] == "arith"
    assert [m.step for m in client.get_metric_history(run_id, "layer.tokens_per_s")] == [0, 1, 2]


def tree(folder: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_calibration_seq_len_above_model_maximum(project: Path) -> None:
    out = project / "outputs"
    before = sorted(p.name for p in out.iterdir())
    calibration = tree(out / "calibration")
    done = run(project, "calibration@general", params(seq_len=200, tracking=False, arith_seq_len=8))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: calibration@general: calibration.sets.general.seq_len: 200 exceeds the model's max_position_embeddings=128"
    )
    assert sorted(p.name for p in out.iterdir()) == before
    assert tree(out / "calibration") == calibration  # nothing written, the set built earlier untouched
    assert not list((out / "calibration").glob("general.tmp-*"))
    # One stage per set: the other set builds with the same params.yaml and touches only its own folder.
    done = run(project, "calibration@arith", params(seq_len=200, tracking=False, arith_seq_len=8))
    assert done.returncode == 0, done.stderr
    assert tuple(load_calibration_set(out / "calibration" / "arith", "arith").input_ids.shape) == (4, 8)
    assert {k: v for k, v in tree(out / "calibration").items() if k.startswith("general/")} == {
        k: v for k, v in calibration.items() if k.startswith("general/")
    }
