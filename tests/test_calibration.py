"""Calibration sets: every source kind from local files, packing, mixing, manifests, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.calibration import (
    allocate,
    build_set,
    load_calibration_set,
    write_calibration_set,
    open_sources,
    pack_blocks,
    separator_token,
    window_blocks,
)
from pipeline.config import CalibrationParams, CalibrationSet, validate
from pipeline.errors import PipelineError
from tests.factory import tiny_tokenizer

DOMAIN_TEXT = {
    "prose": "The quick brown fox jumps over the lazy dog number {i}, and then it rests.",
    "code": "def f{i}(x):\n    return x + {i}\n",
    "arith": "{i} + 35 = {j}",
}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small corpus DatasetDict like the corpus stage's (columns text/domain/source)."""
    from datasets import Dataset, DatasetDict

    def split(n: int, offset: int) -> Dataset:
        rows = {"text": [], "domain": [], "source": []}
        for i in range(offset, offset + n):
            for domain, template in DOMAIN_TEXT.items():
                rows["text"].append(template.format(i=i, j=i + 35))
                rows["domain"].append(domain)
                rows["source"].append(f"test:{domain}")
        return Dataset.from_dict(rows)

    path = tmp_path_factory.mktemp("corpus") / "data"
    DatasetDict({"train": split(60, 0), "validation": split(5, 1000), "test": split(5, 2000)}).save_to_disk(str(path))
    return path


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "hf-cache")


def make_set(**kw: Any) -> CalibrationSet:
    kw.setdefault("num_samples", 6)
    kw.setdefault("seq_len", 16)
    return CalibrationSet.model_validate(kw)


def docs(n: int, words: int = 12) -> list[str]:
    return [" ".join(f"word{(i * 7 + k) % 50}" for k in range(words)) + f" doc {i}." for i in range(n)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def one_line_error(excinfo: pytest.ExceptionInfo[PipelineError]) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# -- sources ------------------------------------------------------------------------------------------
def test_corpus_mixture_of_domains(tokenizer: Any, corpus_dir: Path) -> None:
    spec = make_set(num_samples=9, sources=[{"type": "corpus", "domains": ["prose", "code", "arith"]}])
    ids, manifest = build_set("general", spec, tokenizer, seed=42, corpus_dir=corpus_dir)
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (9, 16)
    assert [s["domain"] for s in manifest["sources"]] == ["prose", "code", "arith"]
    assert [s["samples"] for s in manifest["sources"]] == [3, 3, 3]
    assert sorted(manifest["sample_sources"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert manifest["num_tokens"] == 9 * 16 and manifest["seed"] == 42
    for record in manifest["sources"]:
        assert record["dataset_fingerprint"] and record["content_sha256"] and record["split"] == "train"
    # each block decodes to text of the domain it is attributed to
    markers = {0: "fox", 1: "return", 2: "+"}
    for row, k in zip(ids.tolist(), manifest["sample_sources"], strict=True):
        text = tokenizer.decode(row)
        others = [m for j, m in markers.items() if j != k]
        assert not any(m in text for m in others if len(m) > 1)


def test_local_jsonl_with_named_field(tokenizer: Any, tmp_path: Path, cache_dir: str) -> None:
    path = write_jsonl(tmp_path / "cal.jsonl", docs(40), field="content")
    spec = make_set(sources=[{"type": "local", "path": str(path), "text_field": "content"}])
    ids, manifest = build_set("mine", spec, tokenizer, seed=1, corpus_dir=tmp_path, cache_dir=cache_dir)
    assert tuple(ids.shape) == (6, 16)
    rec = manifest["sources"][0]
    assert rec["format"] == "jsonl" and rec["rows"] == 40 and len(rec["file_sha256"]) == 64
    assert rec["dataset_fingerprint"]


def test_local_json_parquet_txt_give_the_same_documents(tokenizer: Any, tmp_path: Path, cache_dir: str) -> None:
    import pandas as pd

    texts = docs(30)
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in texts]))
    pd.DataFrame({"text": texts, "n": range(30)}).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("\n\n".join(texts) + "\n")
    write_jsonl(tmp_path / "a.jsonl", texts)
    results = {}
    for suffix in ("json", "parquet", "txt", "jsonl"):
        fmt = {"json": "json"}.get(suffix, "auto")
        spec = make_set(sources=[{"type": "local", "path": str(tmp_path / f"a.{suffix}"), "format": fmt}])
        ids, manifest = build_set("s", spec, tokenizer, seed=3, corpus_dir=tmp_path, cache_dir=cache_dir)
        assert manifest["sources"][0]["rows"] == 30, suffix
        results[suffix] = ids
    # same documents in the same order -> the same blocks whatever the file format
    for suffix in ("parquet", "txt", "jsonl"):
        assert torch.equal(results[suffix], results["json"]), suffix


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_source_from_a_local_dataset_directory(tokenizer: Any, tmp_path: Path, cache_dir: str, streaming: bool) -> None:
    repo = tmp_path / "my_dataset"
    repo.mkdir()
    write_jsonl(repo / "train.jsonl", docs(25))
    spec = make_set(sources=[{"type": "hub", "id": str(repo), "split": "train", "streaming": streaming}])
    ids, manifest = build_set("hubset", spec, tokenizer, seed=0, corpus_dir=tmp_path, cache_dir=cache_dir)
    again, _ = build_set("hubset", spec, tokenizer, seed=0, corpus_dir=tmp_path, cache_dir=cache_dir)
    rec = manifest["sources"][0]
    assert tuple(ids.shape) == (6, 16) and torch.equal(ids, again)
    assert rec["type"] == "hub" and rec["rows"] == (None if streaming else 25) and rec["dataset_fingerprint"]


def test_weighted_mixture_of_source_kinds(tokenizer: Any, corpus_dir: Path, tmp_path: Path, cache_dir: str) -> None:
    path = write_jsonl(tmp_path / "w.jsonl", docs(40))
    spec = make_set(
        num_samples=8,
        sources=[
            {"type": "local", "path": str(path), "weight": 3.0},
            {"type": "corpus", "domains": ["arith"], "weight": 1.0},
        ],
    )
    _, manifest = build_set("mix", spec, tokenizer, seed=0, corpus_dir=corpus_dir, cache_dir=cache_dir)
    assert [s["samples"] for s in manifest["sources"]] == [6, 2]
    assert [s["key"] for s in manifest["sources"]] == ["calibration.sets.mix.sources[0]", "calibration.sets.mix.sources[1]"]


@pytest.mark.parametrize(
    ("n", "weights"), [(10, [1.0, 1.0, 1.0]), (7, [0.5, 0.25, 0.25]), (1, [1.0, 2.0]), (128, [1.0, 1.0, 1.0, 1.0, 3.0])]
)
def test_allocate_sums_and_is_proportional(n: int, weights: list[float]) -> None:
    counts = allocate(n, weights)
    assert sum(counts) == n
    total = sum(weights)
    for c, w in zip(counts, weights, strict=True):
        assert abs(c - n * w / total) < 1.0


# -- packing ------------------------------------------------------------------------------------------
def test_packing_concatenates_documents_with_separator(tokenizer: Any, tmp_path: Path, cache_dir: str) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", docs(20, words=5))
    spec = make_set(sources=[{"type": "local", "path": str(path)}])
    (source,) = open_sources(spec, "calibration.sets.p", tmp_path, cache_dir)
    sep = separator_token(tokenizer)
    assert sep == tokenizer.eos_token_id
    blocks, stats = pack_blocks(source, tokenizer, 5, 16, np.random.default_rng(7), sep)
    expected: list[int] = []
    used = 0
    for text in source.documents(np.random.default_rng(7)):
        expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [sep]
        used += 1
        if len(expected) >= 5 * 16:
            break
    assert blocks.shape == (5, 16)
    assert blocks.reshape(-1).tolist() == expected[: 5 * 16]
    assert stats["documents"] == used


def test_windows_without_packing_come_from_single_long_documents(tokenizer: Any, tmp_path: Path, cache_dir: str) -> None:
    texts = docs(10, words=2) + docs(10, words=30)  # the first ten are too short for one block
    path = write_jsonl(tmp_path / "w.jsonl", texts)
    spec = make_set(packing=False, sources=[{"type": "local", "path": str(path)}])
    (source,) = open_sources(spec, "calibration.sets.w", tmp_path, cache_dir)
    blocks, _ = window_blocks(source, tokenizer, 6, 16, np.random.default_rng(0))
    tokenised = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    for row in blocks.tolist():
        hits = [ids for ids in tokenised if any(ids[s : s + 16] == row for s in range(len(ids) - 15))]
        assert hits and all(len(h) >= 16 for h in hits)


def test_sets_are_deterministic_and_seeded(tokenizer: Any, corpus_dir: Path) -> None:
    spec = make_set(sources=[{"type": "corpus", "domains": ["prose", "code"]}])
    a, ma = build_set("g", spec, tokenizer, seed=42, corpus_dir=corpus_dir)
    b, mb = build_set("g", spec, tokenizer, seed=42, corpus_dir=corpus_dir)
    c, _ = build_set("g", spec, tokenizer, seed=43, corpus_dir=corpus_dir)
    assert torch.equal(a, b) and ma == mb
    assert not torch.equal(a, c)


def test_written_set_reads_back_and_reader_checks_it(tokenizer: Any, corpus_dir: Path, tmp_path: Path) -> None:
    spec = make_set(num_samples=4, seq_len=8, sources=[{"type": "corpus", "domains": ["arith"]}])
    ids, info = build_set("arith", spec, tokenizer, seed=42, corpus_dir=corpus_dir, max_positions=128)
    info["model_fingerprint"] = "abc"
    out = tmp_path / "calibration" / "arith"
    write_calibration_set(out, ids, info)
    assert sorted(p.name for p in out.iterdir()) == ["input_ids.safetensors", "manifest.json"]
    data = load_calibration_set(out, "arith")
    assert tuple(data.input_ids.shape) == (4, 8) and data.name == "arith"
    assert data.manifest == info and data.manifest["model_fingerprint"] == "abc"
    assert data.fingerprint == info["fingerprint"]
    with pytest.raises(PipelineError, match=r"search.calibration: calibration set 'c4' is not built .*calibration@c4") as exc:
        load_calibration_set(tmp_path / "calibration" / "c4", "c4")
    one_line_error(exc)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["fingerprint"] = "0" * 16
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match="does not match"):
        load_calibration_set(out, "arith")


# -- bad inputs: one line naming the key, nothing written ----------------------------------------------
def test_seq_len_above_max_positions(tokenizer: Any, corpus_dir: Path) -> None:
    spec = make_set(seq_len=64, sources=[{"type": "corpus", "domains": ["arith"]}])
    with pytest.raises(PipelineError, match=r"^calibration.sets.big.seq_len: 64 exceeds the model's max_position_embeddings=32$") as exc:
        build_set("big", spec, tokenizer, seed=0, corpus_dir=corpus_dir, max_positions=32)
    one_line_error(exc)


def test_missing_text_field(tokenizer: Any, tmp_path: Path, cache_dir: str) -> None:
    path = write_jsonl(tmp_path / "f.jsonl", docs(5), field="body")
    spec = make_set(sources=[{"type": "local", "path": str(path), "text_field": "content"}])
    with pytest.raises(PipelineError, match=r"calibration.sets.s.sources\[0\].text_field: .* has no column 'content' \(columns: body, id\)") as exc:
        build_set("s", spec, tokenizer, seed=0, corpus_dir=tmp_path, cache_dir=cache_dir)
    one_line_error(exc)


def test_non_text_field(tokenizer: Any, tmp_path: Path, cache_dir: str) -> None:
    path = write_jsonl(tmp_path / "f.jsonl", docs(5))
    spec = make_set(sources=[{"type": "local", "path": str(path), "text_field": "id"}])
    with pytest.raises(PipelineError, match=r"text_field: column 'id' .* holds int64, not text"):
        build_set("s", spec, tokenizer, seed=0, corpus_dir=tmp_path, cache_dir=cache_dir)


def test_zero_samples_is_rejected_by_the_params_schema() -> None:
    raw = {"calibration": {"sets": {"general": {"num_samples": 0, "sources": [{"type": "corpus", "domains": ["arith"]}]}}}}
    with pytest.raises(PipelineError, match=r"calibration.sets.general.num_samples: .*greater than or equal to 1") as exc:
        validate(raw)
    one_line_error(exc)


def test_source_without_any_text(tokenizer: Any, tmp_path: Path, cache_dir: str) -> None:
    path = write_jsonl(tmp_path / "e.jsonl", ["", "   ", ""])
    spec = make_set(sources=[{"type": "local", "path": str(path)}])
    with pytest.raises(PipelineError, match=r"sources\[0\]: file .* has no non-empty text") as exc:
        build_set("s", spec, tokenizer, seed=0, corpus_dir=tmp_path, cache_dir=cache_dir)
    one_line_error(exc)


def test_text_too_short_for_one_block(tokenizer: Any, tmp_path: Path, cache_dir: str) -> None:
    path = write_jsonl(tmp_path / "short.jsonl", ["a b", "c d"])
    spec = make_set(sources=[{"type": "local", "path": str(path)}])
    with pytest.raises(PipelineError, match=r"sources\[0\]: .* too short to fill one block of seq_len=16") as exc:
        build_set("s", spec, tokenizer, seed=0, corpus_dir=tmp_path, cache_dir=cache_dir)
    one_line_error(exc)
    spec = make_set(packing=False, sources=[{"type": "local", "path": str(path)}])
    with pytest.raises(PipelineError, match=r"no document .* reaches seq_len=16 tokens .*too short to fill one block"):
        build_set("s", spec, tokenizer, seed=0, corpus_dir=tmp_path, cache_dir=cache_dir)


def test_text_for_too_few_blocks(tokenizer: Any, tmp_path: Path, cache_dir: str) -> None:
    path = write_jsonl(tmp_path / "few.jsonl", docs(2, words=20))
    spec = make_set(num_samples=50, sources=[{"type": "local", "path": str(path)}])
    with pytest.raises(PipelineError, match=r"enough for \d+ of the 50 blocks of seq_len=16"):
        build_set("s", spec, tokenizer, seed=0, corpus_dir=tmp_path, cache_dir=cache_dir)


def test_hub_dataset_while_offline(tokenizer: Any, corpus_dir: Path, cache_dir: str) -> None:
    spec = make_set(sources=[{"type": "corpus", "domains": ["arith"]}, {"type": "hub", "id": "no-such-org/no-such-dataset-xyz"}])
    with pytest.raises(
        PipelineError, match=r"^calibration.sets.c4.sources\[1\].id: hub dataset 'no-such-org/no-such-dataset-xyz' is not in the local cache"
    ) as exc:
        build_set("c4", spec, tokenizer, seed=0, corpus_dir=corpus_dir, cache_dir=cache_dir)
    one_line_error(exc)


def test_missing_corpus_domain_and_file(tokenizer: Any, corpus_dir: Path, tmp_path: Path) -> None:
    spec = make_set(sources=[{"type": "corpus", "domains": ["data"]}])
    with pytest.raises(PipelineError, match=r"sources\[0\].domains: domain 'data' has no documents .*prose"):
        build_set("s", spec, tokenizer, seed=0, corpus_dir=corpus_dir)
    spec = make_set(sources=[{"type": "local", "path": str(tmp_path / "nope.jsonl")}])
    with pytest.raises(PipelineError, match=r"sources\[0\].path: .*nope.jsonl does not exist"):
        build_set("s", spec, tokenizer, seed=0, corpus_dir=corpus_dir)
    with pytest.raises(PipelineError, match=r"corpus .* does not exist; run the corpus stage"):
        build_set("s", make_set(sources=[{"type": "corpus", "domains": ["arith"]}]), tokenizer, seed=0, corpus_dir=tmp_path / "x")


def test_documented_examples_are_valid_params() -> None:
    import re

    import yaml

    text = (Path(__file__).resolve().parents[1] / "docs" / "calibration.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 3
    for block in blocks:
        raw = yaml.safe_load(block)
        params = CalibrationParams.model_validate(raw["calibration"])
        assert params.sets
