"""The calibration and activations stages as DVC runs them: real processes, real MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.activations import ActivationCache
from pipeline.calibration import load_calibration_set
from pipeline.models.loading import ModelManifest, build_manifest
from tests.factory import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]

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
    """A working directory holding the corpus and model stages' outputs."""
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("project")
    texts = {"prose": "The fox {i} jumps over the dog.", "code": "def f{i}(x):\n    return x\n", "arith": "{i} + 2 = {j}"}
    rows = [(t.format(i=i, j=i + 2), d) for i in range(40) for d, t in texts.items()]
    ds = Dataset.from_dict({"text": [r[0] for r in rows], "domain": [r[1] for r in rows], "source": ["test"] * len(rows)})
    DatasetDict({"train": ds, "validation": ds.select(range(6)), "test": ds.select(range(6, 12))}).save_to_disk(
        str(root / "outputs/corpus/data")
    )
    checkpoint = save_tiny_checkpoint(root / "outputs/model/checkpoint", layers=3)
    build_manifest("embedded", checkpoint, None).save(root / "outputs/model/manifest.json")
    for stage in ("corpus", "model"):
        (root / f"outputs/{stage}/run.json").write_text(json.dumps({"run_id": None}))
    return root


def run_stage(root: Path, name: str, p: dict) -> subprocess.CompletedProcess[str]:
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(root / ".hf-datasets"),
    }
    return subprocess.run(
        [sys.executable, "-m", f"stages.{name}"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_calibration_then_activations(project: Path) -> None:
    done = run_stage(project, "calibration", params())
    assert done.returncode == 0, done.stderr
    out = project / "outputs/calibration"
    assert {"general.safetensors", "general.json", "arith.safetensors", "arith.json", "run.json"} <= {p.name for p in out.iterdir()}
    arith = load_calibration_set(out, "arith")
    assert tuple(arith.input_ids.shape) == (4, 16)

    done = run_stage(project, "activations", params())
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


def test_calibration_seq_len_above_model_maximum(project: Path) -> None:
    before = sorted(p.name for p in (project / "outputs").iterdir())
    done = run_stage(project, "calibration", params(seq_len=200, tracking=False, arith_seq_len=8))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: calibration: calibration.sets.general.seq_len: 200 exceeds the model's max_position_embeddings=128"
    )
    assert sorted(p.name for p in (project / "outputs").iterdir()) == before
    assert not list((project / "outputs").glob("calibration.tmp-*"))
