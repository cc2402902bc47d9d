"""Shared fixtures and test environment: offline, quiet, deterministic."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def tiny_mixtral():
    """A tiny random Mixtral (2 layers, 8 experts, top-2)."""
    from tests.factory import tiny_model

    return tiny_model("mixtral")


@pytest.fixture(scope="session")
def compared_project(tmp_path_factory):
    """A tiny project run end to end twice (search.r 6, then `dvc exp run -S search.r=4`), both
    committed; MLflow store in ``<project>/mlflow.db``. Shared by the UI, plots and team tests."""
    from tests.project import run_twice

    return run_twice(tmp_path_factory.mktemp("compared") / "project")
