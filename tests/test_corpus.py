"""The offline corpus: determinism, disjoint splits, distinct domains, valid benchmark items, the stage."""

from __future__ import annotations

import ast
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline.corpus import (
    SPLITS,
    build_corpus,
    build_eval,
    chunk_text,
    corpus_manifest,
    split_source,
    stdlib_files,
    write_corpus,
)
from pipeline.config import CorpusEvalParams, CorpusParams
from pipeline.errors import PipelineError
from pipeline.evaluate.tasks import embedded_tasks
from stages.spec import spec
from tests.project import run_stage, stage_dir_project

ALL = ("prose", "code", "arith", "data")
EVAL = CorpusEvalParams(
    mc_items_per_domain=20,
    mc_choices=4,
    context_chars=80,
    continuation_chars=30,
    ppl_docs_per_domain=3,
    ppl_doc_chars=200,
)
SMALL = CorpusParams(
    domains=list(ALL), seed=7, max_chars_per_domain=24_000, doc_chars=400, validation_fraction=0.1, test_fraction=0.15,
    eval=EVAL,
)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(SMALL)


@pytest.fixture(scope="module")
def evals(corpus):
    return build_eval(corpus, SMALL.domains, EVAL, SMALL.seed)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_params_give_byte_identical_outputs(tmp_path, corpus, evals):
    again = build_corpus(SMALL)
    assert again.fingerprint() == corpus.fingerprint()
    for name, c in (("a", corpus), ("b", again)):
        ev = build_eval(c, SMALL.domains, EVAL, SMALL.seed)
        write_corpus(tmp_path / name, c, ev, corpus_manifest(c, ev, SMALL))
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    other = build_corpus(SMALL.model_copy(update={"seed": 8}))
    assert other.fingerprint() != corpus.fingerprint()


def test_splits_are_disjoint_and_cover_every_domain(corpus):
    texts = {split: [d.text for d in corpus.splits[split]] for split in SPLITS}
    for split in SPLITS:
        assert len(set(texts[split])) == len(texts[split]), f"duplicate documents in {split}"
        assert {d.domain for d in corpus.splits[split]} == set(ALL)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not set(texts[a]) & set(texts[b]), f"{a} and {b} share documents"
    stats = corpus.stats()
    for domain in ALL:
        total = sum(stats[s][domain]["chars"] for s in SPLITS)
        assert total <= SMALL.max_chars_per_domain
        assert stats["test"][domain]["docs"] >= EVAL.mc_choices
    for d in (d for docs in corpus.splits.values() for d in docs):
        assert SMALL.doc_chars // 4 <= len(d.text) <= SMALL.doc_chars
        assert d.source


def test_domains_differ(corpus):
    by_domain = {dom: [d for d in corpus.splits["train"] if d.domain == dom] for dom in ALL}
    assert all(d.source.startswith(("stdlib:", "pydoc_data.topics:")) for d in by_domain["prose"])
    assert all(d.source.startswith("stdlib:") for d in by_domain["code"])
    code = "\n".join(d.text for d in by_domain["code"])
    prose = "\n".join(d.text for d in by_domain["prose"])
    assert code.count("def ") > 10 * max(1, prose.count("def "))
    assert code.count('"""') < 0.01 * code.count("\n")
    for doc in by_domain["arith"]:
        for line in doc.text.splitlines():
            expr, _, result = line.rpartition(" = ")
            assert eval(expr.replace("/", "//"), {"__builtins__": {}}) == int(result), line  # noqa: S307
    for doc in by_domain["data"]:
        first = doc.text.splitlines()[0]
        assert first.startswith("{") or first.startswith("order_id,")
        if first.startswith("{"):
            assert all(isinstance(json.loads(line), dict) for line in doc.text.splitlines())


def test_code_without_docstrings_still_parses():
    files = stdlib_files()[:: max(1, len(stdlib_files()) // 25)]
    for path in files:
        parts = split_source(path.read_text(encoding="utf-8", errors="replace"))
        if parts is None:
            continue
        docstrings, code = parts
        ast.parse(code)
        again = split_source(code)
        assert again is not None and again[0] == [], f"{path}: docstrings left in the code"


def test_chunk_text_respects_size_and_lines():
    text = "\n".join(f"line {i} " + "x" * (i % 37) for i in range(500))
    pieces = chunk_text(text, 200)
    assert all(50 <= len(p) <= 200 for p in pieces)
    assert all(p.startswith("line ") for p in pieces)
    pos = 0
    for piece in pieces:  # consecutive, non-overlapping slices of the text, cut at line ends
        at = text.index(piece, pos)
        assert at == pos and (at == 0 or text[at - 1] == "\n")
        pos = at + len(piece) + 1
    assert pos >= len(text) - 200


def test_text_mc_items_are_valid(corpus, evals):
    for domain in ("prose", "code", "data"):
        tests = [d.text for d in corpus.splits["test"] if d.domain == domain]
        trains = {d.text for d in corpus.splits["train"]}
        items = evals[domain]["mc"]
        assert len(items) == EVAL.mc_items_per_domain
        assert len({i["id"] for i in items}) == len(items)
        for item in items:
            choices, label = item["choices"], item["label"]
            assert len(choices) == EVAL.mc_choices and len(set(choices)) == len(choices)
            assert 0 <= label < len(choices)
            assert len(item["context"]) == EVAL.context_chars
            assert all(len(c) == EVAL.continuation_chars for c in choices)
            truth = item["context"] + choices[label]
            owners = [t for t in tests if truth in t]
            assert owners, "context + true continuation is not test text"
            for j, c in enumerate(choices):
                if j != label:
                    assert any(c in t for t in tests if t not in owners), "distractor not from another test document"
            assert not any(truth in t for t in trains)
        labels = Counter(i["label"] for i in items)
        assert len(labels) >= 3, f"labels not shuffled: {labels}"


def test_arith_mc_items_are_valid(evals):
    items = evals["arith"]["mc"]
    assert len(items) == EVAL.mc_items_per_domain
    for item in items:
        expr = item["context"].splitlines()[-1]
        assert expr.endswith(" =")
        value = eval(expr[:-2].replace("/", "//"), {"__builtins__": {}})  # noqa: S307
        results = [int(c) for c in item["choices"]]
        assert all(c.startswith(" ") for c in item["choices"])
        assert results[item["label"]] == value
        assert len(set(results)) == len(results) and all(r >= 0 for r in results)
        assert all(0 < abs(r - value) <= 100 for j, r in enumerate(results) if j != item["label"])
        assert len(item["context"]) <= EVAL.context_chars
    assert len(Counter(i["label"] for i in items)) >= 3


def test_ppl_documents_come_from_test(corpus, evals):
    for domain in ALL:
        tests = [d.text for d in corpus.splits["test"] if d.domain == domain]
        rows = evals[domain]["ppl"]
        assert len(rows) == min(EVAL.ppl_docs_per_domain, len(tests))
        for row in rows:
            assert 0 < len(row["text"]) <= EVAL.ppl_doc_chars
            assert any(t.startswith(row["text"]) for t in tests)


def test_too_small_corpus_is_a_one_line_error():
    with pytest.raises(PipelineError, match="corpus.max_chars_per_domain"):
        build_corpus(CorpusParams(domains=["arith", "data"], max_chars_per_domain=10_000, doc_chars=5000))
    tiny = build_corpus(CorpusParams(domains=["arith", "data"], max_chars_per_domain=10_000, doc_chars=1000))
    with pytest.raises(PipelineError, match="corpus.test_fraction") as err:
        build_eval(tiny, ("data",), EVAL, 0)
    assert "\n" not in str(err.value)


def _project(tmp_path: Path, **corpus_overrides) -> Path:
    """A bare stage folder whose params.yaml has ``corpus_overrides`` (no MLflow)."""
    return stage_dir_project(tmp_path / "project", {"corpus": corpus_overrides, "tracking": {"enabled": False}})


def test_corpus_stage_writes_the_declared_outputs(tmp_path, monkeypatch):
    project = _project(
        tmp_path,
        domains=["prose", "arith"],
        max_chars_per_domain=20_000,
        doc_chars=400,
        test_fraction=0.2,
        eval=EVAL.model_dump(),
    )
    proc = run_stage(project, "corpus")
    assert proc.returncode == 0, proc.stderr
    out = project / "outputs" / "corpus"
    for path in spec("corpus", project).outs:
        assert (project / path).exists(), f"dvc.yaml declares {path} but the stage did not write it"
    import datasets

    dd = datasets.load_from_disk(str(out / "data"))
    assert set(dd) == set(SPLITS)
    assert dd["train"].column_names == ["text", "domain", "source"]
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    for split in SPLITS:
        for domain in ("prose", "arith"):
            n = sum(1 for d in dd[split]["domain"] if d == domain)
            assert manifest["splits"][split][domain]["docs"] == n == metrics[f"docs.{split}.{domain}"]
    for domain in ("prose", "arith"):
        lines = (out / "eval" / f"{domain}_mc.jsonl").read_text().splitlines()
        assert len(lines) == manifest["eval"][domain]["mc_items"] == EVAL.mc_items_per_domain
        assert set(json.loads(lines[0])) == {"id", "context", "choices", "label"}
        assert (out / "eval" / f"{domain}_ppl.jsonl").is_file()
    # eval/ is an lm-eval include path whose YAMLs name their data relative to the project root
    monkeypatch.chdir(project)
    tasks = embedded_tasks(Path("outputs/corpus/eval"))
    assert [(t.name, t.data_file.as_posix()) for t in tasks] == [
        (f"embedded_{domain}_{kind}", f"outputs/corpus/eval/{domain}_{kind}.jsonl")
        for domain in ("arith", "prose")
        for kind in ("mc", "ppl")
    ]
    assert len(list((out / "eval").glob("*.yaml"))) == len(tasks)


def test_corpus_stage_error_is_one_line(tmp_path):
    project = _project(tmp_path, domains=["prose", "arith"], max_chars_per_domain=10_000, doc_chars=6000)
    proc = run_stage(project, "corpus")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: corpus: corpus.max_chars_per_domain")
    assert not (project / "outputs" / "corpus").exists()
