"""The offline multi-domain corpus and its held-out benchmark data.

Every domain is built from material present on any machine with Python 3.11, or generated from a
seed, so nothing is downloaded:

- ``prose``: English text: ``pydoc_data.topics`` (the language reference) and the docstrings of the
  standard-library modules, read with :mod:`ast` from the source files (nothing is imported);
- ``code``: the standard-library source with its docstrings removed (so code and prose differ);
- ``arith``: generated arithmetic, one- and multi-step (``(12 + 7) * 3 = 57``);
- ``data``: generated structured records (JSON lines and CSV blocks).

Documents are about ``doc_chars`` characters, cut at line boundaries. Splits are disjoint at
document level; the same parameters and the same Python installation give byte-identical outputs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import random
import sys
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import CorpusEvalParams, CorpusParams
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
#: Standard-library folders left out: tests (huge, repetitive), IDLE and lib2to3 (fixtures), vendored packages.
#: encodings (codec tables) and pydoc_data (the help text, used as prose) are data, not code.
_SKIPPED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "__pycache__",
        "ensurepip",
        "encodings",
        "pydoc_data",
    }
)
_MIN_DOCSTRING_CHARS = 80


@dataclass(frozen=True)
class Document:
    """One corpus document."""

    text: str
    domain: str
    source: str


@dataclass
class Corpus:
    """Documents of every domain, per split."""

    splits: dict[str, list[Document]] = field(default_factory=dict)

    def stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{split: {domain: {"docs": n, "chars": n}}}``."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for split, docs in self.splits.items():
            per: dict[str, dict[str, int]] = {}
            for doc in docs:
                entry = per.setdefault(doc.domain, {"docs": 0, "chars": 0})
                entry["docs"] += 1
                entry["chars"] += len(doc.text)
            out[split] = dict(sorted(per.items()))
        return out

    def fingerprint(self) -> str:
        """SHA-256 (16 hex) over every document's split, domain, source and text, in order."""
        digest = hashlib.sha256()
        for split in SPLITS:
            for doc in self.splits.get(split, []):
                for part in (split, doc.domain, doc.source, doc.text):
                    digest.update(part.encode("utf-8"))
                    digest.update(b"\0")
        return digest.hexdigest()[:16]


# -- cutting text into documents -----------------------------------------------------------------
def chunk_text(text: str, doc_chars: int) -> list[str]:
    """Cut ``text`` into pieces of about ``doc_chars`` characters, at line ends where possible.

    Every piece is at most ``doc_chars`` long; pieces shorter than a quarter of it (a tail) are
    dropped, as are pieces with nothing but whitespace.
    """
    pieces: list[str] = []
    start, n = 0, len(text)
    while start < n:
        end = min(start + doc_chars, n)
        if end < n:
            cut = text.rfind("\n", start + doc_chars // 2, end)
            if cut == -1:
                cut = text.rfind(" ", start + doc_chars // 2, end)
            end = cut + 1 if cut != -1 else end
        piece = text[start:end].strip("\n")
        if len(piece) >= doc_chars // 4 and piece.strip():
            pieces.append(piece)
        start = end
    return pieces


# -- the Python standard library: prose and code -------------------------------------------------
def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files (no tests, IDLE, lib2to3 or site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    if not root.is_dir():
        raise PipelineError(f"the Python standard library folder {root} does not exist")
    files = [p for p in root.rglob("*.py") if not (_SKIPPED_DIRS & set(p.relative_to(root).parts[:-1]))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_BLOCKS = (ast.If, ast.Try, ast.With, ast.For, ast.While)


def _docstring_nodes(tree: ast.Module) -> list[ast.AST]:
    """The module and every class/function at any nesting, in source order."""
    found: list[ast.AST] = [tree]
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, _DEFS):
                found.append(child)
                stack.append(child)
            elif isinstance(child, _BLOCKS):
                stack.append(child)
    return sorted(found, key=lambda n: getattr(n, "lineno", 0))


def split_source(source: str) -> tuple[list[str], str] | None:
    """A module's docstrings, and its source with every docstring removed; None when it does not parse.

    A docstring that is a function's whole body becomes ``pass`` so the code stays valid.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    docstrings: list[str] = []
    replace: dict[int, str | None] = {}  # 1-based line -> replacement (None: drop the line)
    for node in _docstring_nodes(tree):
        body = getattr(node, "body", None)
        if not body or not isinstance(body[0], ast.Expr):
            continue
        value = body[0].value
        if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
            continue
        text = ast.get_docstring(node, clean=True)
        if text:
            docstrings.append(text)
        first, last = body[0].lineno, body[0].end_lineno or body[0].lineno
        if getattr(node, "lineno", 0) == first or (len(body) > 1 and body[1].lineno == last):
            continue  # shares a line with other code: leave it
        for line in range(first, last + 1):
            replace[line] = None
        if len(body) == 1 and not isinstance(node, ast.Module):
            replace[first] = " " * body[0].col_offset + "pass\n"
    lines = source.splitlines(keepends=True)
    code = "".join(replace.get(i, line) or "" for i, line in enumerate(lines, start=1))
    return docstrings, code


def _prose_filter(text: str) -> bool:
    letters = sum(c.isalpha() for c in text)
    return len(text) >= _MIN_DOCSTRING_CHARS and letters >= 0.6 * len(text)


def pydoc_topics() -> list[tuple[str, str]]:
    """``(topic, text)`` of the interpreter's help topics (the language reference), sorted by topic."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


class StdlibReader:
    """Reads the standard library once for the prose and code domains, lazily, in a seeded order.

    Files are visited in a seeded shuffle of the sorted file list, and only until both domains
    have what they need, so a small corpus parses only a few files.
    """

    def __init__(self, seed: int, root: Path | None = None) -> None:
        self.root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
        files = stdlib_files(self.root)
        random.Random(f"{seed}:stdlib").shuffle(files)
        self._files = files
        self._cache: dict[Path, tuple[list[str], str] | None] = {}
        self.files_read = 0

    def _split(self, path: Path) -> tuple[list[str], str] | None:
        if path not in self._cache:
            self.files_read += 1
            text = path.read_text(encoding="utf-8", errors="replace")
            self._cache[path] = split_source(text)
        return self._cache[path]

    def _name(self, path: Path) -> str:
        return "stdlib:" + path.relative_to(self.root).as_posix()

    def docstrings(self) -> Iterator[tuple[str, str]]:
        """``(source, text)`` per module: its long docstrings joined by blank lines."""
        seen: set[str] = set()
        for path in self._files:
            parts = self._split(path)
            if parts is None:
                continue
            kept = []
            for doc in parts[0]:
                if _prose_filter(doc) and doc not in seen:
                    seen.add(doc)
                    kept.append(doc)
            if kept:
                yield self._name(path), "\n\n".join(kept)

    def code(self) -> Iterator[tuple[str, str]]:
        """``(source, code)`` per module, docstrings removed, runs of blank lines squeezed."""
        for path in self._files:
            parts = self._split(path)
            if parts is None:
                continue
            lines, blank = [], 0
            for line in parts[1].splitlines():
                blank = blank + 1 if not line.strip() else 0
                if blank <= 1:
                    lines.append(line.rstrip())
            yield self._name(path), "\n".join(lines)


def _take(streams: Iterator[tuple[str, str]], domain: str, settings: CorpusParams) -> list[Document]:
    """Documents cut from ``(source, text)`` streams until the domain's character budget is spent."""
    docs: list[Document] = []
    seen: set[str] = set()
    total = 0
    for source, text in streams:
        for piece in chunk_text(text, settings.doc_chars):
            if piece in seen:
                continue
            if total + len(piece) > settings.max_chars_per_domain:
                return docs
            seen.add(piece)
            docs.append(Document(piece, domain, source))
            total += len(piece)
    return docs


def prose_documents(settings: CorpusParams, reader: StdlibReader) -> list[Document]:
    """English prose: the help topics, then module docstrings, until the budget is spent."""

    def streams() -> Iterator[tuple[str, str]]:
        topics = pydoc_topics()
        random.Random(f"{settings.seed}:topics").shuffle(topics)
        # Interleave topics and docstrings so a small budget still mixes both sources.
        doc_iter = reader.docstrings()
        for name, text in topics:
            yield f"pydoc_data.topics:{name}", text
            nxt = next(doc_iter, None)
            if nxt is not None:
                yield nxt
        yield from doc_iter

    return _take(streams(), "prose", settings)


def code_documents(settings: CorpusParams, reader: StdlibReader) -> list[Document]:
    """Python source of the standard library without docstrings."""
    return _take(reader.code(), "code", settings)


# -- generated domains ---------------------------------------------------------------------------
def _arith_line(rng: random.Random) -> str:
    """One arithmetic fact with a non-negative integer result, e.g. ``(12 + 7) * 3 = 57``."""
    kind = rng.random()
    if kind < 0.3:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a} + {b} = {a + b}"
    if kind < 0.5:
        a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
        return f"{a} - {b} = {a - b}"
    if kind < 0.65:
        a, b = rng.randint(2, 19), rng.randint(2, 12)
        return f"{a} * {b} = {a * b}"
    if kind < 0.75:
        b, q = rng.randint(2, 12), rng.randint(1, 12)
        return f"{b * q} / {b} = {q}"
    if kind < 0.85:
        a, b, c = rng.randint(1, 50), rng.randint(1, 50), rng.randint(2, 9)
        return f"({a} + {b}) * {c} = {(a + b) * c}"
    if kind < 0.93:
        a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(0, 50)
        return f"{a} * {b} + {c} = {a * b + c}"
    a, b = rng.randint(1, 60), rng.randint(1, 60)
    c = rng.randint(0, a + b)
    return f"{a} + {b} - {c} = {a + b - c}"


def arith_documents(settings: CorpusParams) -> list[Document]:
    """Generated arithmetic: documents of one fact per line (seeded)."""
    rng = random.Random(f"{settings.seed}:arith")

    def streams() -> Iterator[tuple[str, str]]:
        i = 0
        while True:
            lines, size = [], 0
            while size < settings.doc_chars - 24:
                line = _arith_line(rng)
                lines.append(line)
                size += len(line) + 1
            yield f"generated:arith:{i}", "\n".join(lines)
            i += 1

    return _take(streams(), "arith", settings)


_FIRST = (
    "Ada",
    "Alan",
    "Grace",
    "Linus",
    "Guido",
    "Barbara",
    "Edsger",
    "Donald",
    "Frances",
    "Ken",
    "Dennis",
    "Margaret",
    "John",
    "Radia",
    "Tim",
    "Sophie",
    "Niklaus",
    "Leslie",
    "Hedy",
    "Claude",
)
_CITY = ("Oslo", "Lima", "Pune", "Lyon", "Kyoto", "Accra", "Quito", "Perth", "Turin", "Leeds", "Cusco", "Graz")
_ITEM = ("bolt", "gear", "valve", "cable", "lamp", "pump", "relay", "sensor", "switch", "fan", "fuse", "hinge")
_STATUS = ("ok", "late", "lost", "open", "closed", "pending")


def _json_record(rng: random.Random, i: int) -> str:
    record = {
        "id": i,
        "name": f"{rng.choice(_FIRST)} {rng.choice(_FIRST)}son",
        "city": rng.choice(_CITY),
        "age": rng.randint(18, 90),
        "score": round(rng.random() * 100, 2),
        "tags": sorted(rng.sample(_ITEM, rng.randint(1, 3))),
        "active": rng.random() < 0.5,
    }
    return json.dumps(record, sort_keys=False)


def _csv_block(rng: random.Random, start: int, rows: int) -> str:
    lines = ["order_id,item,qty,unit_price,total,status"]
    for j in range(rows):
        qty, price = rng.randint(1, 40), rng.randint(1, 500) / 4
        lines.append(f"{start + j},{rng.choice(_ITEM)},{qty},{price:.2f},{qty * price:.2f},{rng.choice(_STATUS)}")
    return "\n".join(lines)


def data_documents(settings: CorpusParams) -> list[Document]:
    """Generated structured records: JSON lines or a CSV table per document (seeded)."""
    rng = random.Random(f"{settings.seed}:data")

    def streams() -> Iterator[tuple[str, str]]:
        i = 0
        while True:
            lines, size = [], 0
            as_json = rng.random() < 0.5
            while size < settings.doc_chars - 150:
                line = (
                    _json_record(rng, rng.randint(1000, 99999)) if as_json else _csv_block(rng, rng.randint(1, 9000), 5)
                )
                lines.append(line)
                size += len(line) + 1
            yield f"generated:data:{'jsonl' if as_json else 'csv'}:{i}", "\n".join(lines)
            i += 1

    return _take(streams(), "data", settings)


# -- splits --------------------------------------------------------------------------------------
def split_documents(docs: Sequence[Document], settings: CorpusParams) -> dict[str, list[Document]]:
    """A seeded document-level split of one domain; each split gets at least one document."""
    domain = docs[0].domain if docs else "?"
    if len(docs) < 3:
        raise PipelineError(
            f"corpus.max_chars_per_domain: domain {domain} has only {len(docs)} documents; "
            "at least 3 are needed for train/validation/test (raise max_chars_per_domain or lower doc_chars)"
        )
    order = list(range(len(docs)))
    random.Random(f"{settings.seed}:split:{domain}").shuffle(order)
    n_test = max(1, round(len(docs) * settings.test_fraction))
    n_val = max(1, round(len(docs) * settings.validation_fraction))
    if n_test + n_val >= len(docs):
        raise PipelineError(
            f"corpus.test_fraction: domain {domain} has {len(docs)} documents, too few to leave a train split"
        )
    pick = {
        "test": sorted(order[:n_test]),
        "validation": sorted(order[n_test : n_test + n_val]),
        "train": sorted(order[n_test + n_val :]),
    }
    return {split: [docs[i] for i in pick[split]] for split in SPLITS}


_BUILDERS: dict[str, Callable[[CorpusParams, StdlibReader], list[Document]]] = {
    "prose": prose_documents,
    "code": code_documents,
    "arith": lambda s, _r: arith_documents(s),
    "data": lambda s, _r: data_documents(s),
}


def build_corpus(settings: CorpusParams, stdlib_root: Path | None = None) -> Corpus:
    """Every domain's documents, split into train/validation/test (train shuffled across domains)."""
    reader = StdlibReader(settings.seed, stdlib_root)
    corpus = Corpus({split: [] for split in SPLITS})
    for domain in settings.domains:
        if domain not in _BUILDERS:
            raise PipelineError(f"corpus.domains: unknown domain {domain!r} (allowed: {', '.join(_BUILDERS)})")
        docs = _BUILDERS[domain](settings, reader)
        log.info("corpus: %s: %d documents, %d chars", domain, len(docs), sum(len(d.text) for d in docs))
        for split, part in split_documents(docs, settings).items():
            corpus.splits[split].extend(part)
    random.Random(f"{settings.seed}:mix").shuffle(corpus.splits["train"])
    log.info("corpus: read %d standard-library files", reader.files_read)
    return corpus


def provenance() -> dict[str, Any]:
    """Where the stdlib-derived domains came from (the interpreter that built them)."""
    return {
        "python": sys.version.split()[0],
        "implementation": sys.implementation.name,
        "stdlib": sysconfig.get_paths()["stdlib"],
    }


# -- held-out benchmark data ---------------------------------------------------------------------
def _boundary(text: str, pos: int, lo: int, hi: int) -> int | None:
    """The position nearest ``pos`` in ``[lo, hi]`` that starts a word (follows whitespace)."""
    for delta in range(0, max(pos - lo, hi - pos) + 1):
        for p in (pos - delta, pos + delta):
            if lo <= p <= hi and text[p - 1].isspace() and not text[p].isspace():
                return p
    return None


def text_mc_items(docs: Sequence[Document], settings: CorpusEvalParams, rng: random.Random) -> list[dict[str, Any]]:
    """Continuation items: a context, its true continuation and continuations of other documents.

    Every choice has exactly ``continuation_chars`` characters and starts a word; distractors come
    from other documents at a similar offset. ``context + choices[label]`` is the document's text.
    """
    ctx_n, cont_n, k = settings.context_chars, settings.continuation_chars, settings.mc_choices
    usable = [d for d in docs if len(d.text) >= ctx_n + cont_n + 1]
    if len(usable) < k:
        domain = docs[0].domain if docs else "?"
        raise PipelineError(
            f"corpus.test_fraction: the {domain} test split has {len(usable)} documents of at least "
            f"{ctx_n + cont_n + 1} chars, fewer than corpus.eval.mc_choices={k}; raise corpus.test_fraction "
            "or corpus.max_chars_per_domain"
        )
    items: list[dict[str, Any]] = []
    used: set[tuple[int, int]] = set()
    order = list(range(len(usable)))
    rng.shuffle(order)
    for attempt in range(20 * settings.mc_items_per_domain):
        if len(items) == settings.mc_items_per_domain:
            break
        i = order[attempt % len(order)]
        doc = usable[i].text
        start = _boundary(doc, rng.randint(ctx_n, len(doc) - cont_n), ctx_n, len(doc) - cont_n)
        if start is None or (i, start) in used:
            continue
        used.add((i, start))
        truth = doc[start : start + cont_n]
        others = [j for j in range(len(usable)) if j != i]
        rng.shuffle(others)
        distractors: list[str] = []
        for j in others:
            other = usable[j].text
            hi = len(other) - cont_n
            pos = _boundary(other, min(start, hi), min(ctx_n, hi), hi)
            if pos is None:
                continue
            cand = other[pos : pos + cont_n]
            if cand != truth and cand not in distractors:
                distractors.append(cand)
            if len(distractors) == k - 1:
                break
        if len(distractors) < k - 1:
            continue
        items.append(_mc_item(doc[start - ctx_n : start], truth, distractors, rng))
    return items


def _arith_wrong(result: int, rng: random.Random, n: int) -> list[int]:
    """``n`` distinct wrong results near ``result``: off by one or two, by ten, or a digit changed."""
    near, far = [-2, -1, 1, 2, -10, 10], [3, -3, 9, 11, -9, -11, 20, -20, 100, -100]
    rng.shuffle(near)
    rng.shuffle(far)
    deltas = near + far
    wrong: list[int] = []
    for d in deltas:
        w = result + d
        if w >= 0 and w != result and w not in wrong:
            wrong.append(w)
        if len(wrong) == n:
            break
    return wrong


def arith_mc_items(docs: Sequence[Document], settings: CorpusEvalParams, rng: random.Random) -> list[dict[str, Any]]:
    """Result items: the previous lines plus ``<expression> =``; the correct result vs wrong ones."""
    facts: list[tuple[str, str, int]] = []  # (preceding text, expression, result)
    for doc in docs:
        lines = doc.text.split("\n")
        for n, line in enumerate(lines):
            expr, sep, res = line.rpartition(" = ")
            if sep and res.isdigit():
                before = "\n".join(lines[:n])
                facts.append((before, expr, int(res)))
    if not facts:
        raise PipelineError("corpus.test_fraction: the arith test split has no arithmetic lines")
    rng.shuffle(facts)
    items = []
    for n in range(min(settings.mc_items_per_domain, len(facts))):
        before, expr, result = facts[n]
        context = (before + "\n" if before else "") + expr + " ="
        if len(context) > settings.context_chars:
            cut = context.find("\n", len(context) - settings.context_chars)
            context = context[cut + 1 :] if cut != -1 else context[-settings.context_chars :]
        wrong = _arith_wrong(result, rng, settings.mc_choices - 1)
        items.append(_mc_item(context, f" {result}", [f" {w}" for w in wrong], rng))
    return items


def _mc_item(context: str, truth: str, distractors: list[str], rng: random.Random) -> dict[str, Any]:
    label = rng.randrange(len(distractors) + 1)
    choices = list(distractors)
    choices.insert(label, truth)
    return {"context": context, "choices": choices, "label": label}


def build_eval(
    corpus: Corpus, domains: Sequence[str], settings: CorpusEvalParams, seed: int
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per domain, ``{"mc": [...], "ppl": [...]}`` from the test split (items carry ids)."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for domain in domains:
        docs = [d for d in corpus.splits["test"] if d.domain == domain]
        rng = random.Random(f"{seed}:eval:{domain}")
        make = arith_mc_items if domain == "arith" else text_mc_items
        mc = [{"id": f"{domain}-mc-{n:04d}", **item} for n, item in enumerate(make(docs, settings, rng))]
        ppl = []
        for n, doc in enumerate(docs[: settings.ppl_docs_per_domain]):
            text = doc.text
            if len(text) > settings.ppl_doc_chars:
                cut = text.rfind("\n", settings.ppl_doc_chars // 2, settings.ppl_doc_chars)
                text = text[: cut if cut != -1 else settings.ppl_doc_chars]
            ppl.append({"id": f"{domain}-ppl-{n:04d}", "text": text})
        out[domain] = {"mc": mc, "ppl": ppl}
    return out


# -- writing -------------------------------------------------------------------------------------
def to_dataset_dict(corpus: Corpus) -> Any:
    """The corpus as a ``datasets.DatasetDict`` with columns text, domain, source."""
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "domain": datasets.Value("string"), "source": datasets.Value("string")}
    )
    parts = {}
    for split in SPLITS:
        docs = corpus.splits[split]
        parts[split] = datasets.Dataset.from_dict(
            {"text": [d.text for d in docs], "domain": [d.domain for d in docs], "source": [d.source for d in docs]},
            features=features,
        )
    return datasets.DatasetDict(parts)


def jsonl(rows: Sequence[dict[str, Any]]) -> str:
    """JSON lines with sorted keys."""
    return "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)


def _source_kind(source: str) -> str:
    """``stdlib:json/decoder.py`` -> ``stdlib``; ``generated:arith:3`` -> ``generated:arith``."""
    head, _, rest = source.partition(":")
    return f"{head}:{rest.partition(':')[0]}" if head == "generated" else head


def corpus_manifest(
    corpus: Corpus,
    evals: dict[str, dict[str, list[dict[str, Any]]]],
    settings: CorpusParams,
) -> dict[str, Any]:
    """Domains, documents and characters per split and domain, sources, eval files, fingerprint."""
    sources: dict[str, dict[str, Any]] = {}
    for docs in corpus.splits.values():
        for doc in docs:
            entry = sources.setdefault(doc.domain, {"documents_by_kind": {}, "distinct_sources": set()})
            kind = _source_kind(doc.source)
            entry["documents_by_kind"][kind] = entry["documents_by_kind"].get(kind, 0) + 1
            entry["distinct_sources"].add(doc.source)
    return {
        "domains": list(settings.domains),
        "splits": corpus.stats(),
        "sources": {
            d: {
                "documents_by_kind": dict(sorted(e["documents_by_kind"].items())),
                "distinct_sources": len(e["distinct_sources"]),
            }
            for d, e in sorted(sources.items())
        },
        "eval": {
            d: {
                "mc_file": f"eval/{d}_mc.jsonl",
                "mc_items": len(e["mc"]),
                "ppl_file": f"eval/{d}_ppl.jsonl",
                "ppl_docs": len(e["ppl"]),
            }
            for d, e in evals.items()
        },
        "settings": settings.model_dump(mode="json"),
        "provenance": provenance(),
        "fingerprint": corpus.fingerprint(),
    }


def write_corpus(
    out: str | Path, corpus: Corpus, evals: dict[str, dict[str, list[dict[str, Any]]]], manifest: dict[str, Any]
) -> None:
    """Write ``data/`` (DatasetDict), ``eval/<domain>_{mc,ppl}.jsonl`` and ``manifest.json`` into ``out``."""
    import datasets

    from pipeline.io import atomic_dir, atomic_write_text, write_json

    out = Path(out)
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with atomic_dir(out / "data") as tmp:
            to_dataset_dict(corpus).save_to_disk(str(tmp))
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    for domain, parts in evals.items():
        atomic_write_text(out / "eval" / f"{domain}_mc.jsonl", jsonl(parts["mc"]))
        atomic_write_text(out / "eval" / f"{domain}_ppl.jsonl", jsonl(parts["ppl"]))
    write_json(out / "manifest.json", manifest)


def corpus_metrics(manifest: dict[str, Any]) -> dict[str, int]:
    """Flat metrics: ``docs.<split>.<domain>``, ``chars.<split>.<domain>``, ``mc_items.<domain>``."""
    metrics: dict[str, int] = {}
    for split, per in manifest["splits"].items():
        for domain, entry in per.items():
            metrics[f"docs.{split}.{domain}"] = entry["docs"]
            metrics[f"chars.{split}.{domain}"] = entry["chars"]
    for domain, entry in manifest["eval"].items():
        metrics[f"mc_items.{domain}"] = entry["mc_items"]
        metrics[f"ppl_docs.{domain}"] = entry["ppl_docs"]
    return metrics


def load_corpus(path: str | Path, split: str | None = None) -> Any:
    """Load the corpus stage's ``data/`` (a DatasetDict, or one split of it)."""
    import datasets

    path = Path(path)
    if not (path / "dataset_dict.json").is_file():
        raise PipelineError(f"corpus data {path} does not exist: run the corpus stage first (dvc repro corpus)")
    dd = datasets.load_from_disk(str(path))
    if split is None:
        return dd
    if split not in dd:
        raise PipelineError(f"corpus data {path} has no split {split!r} (has: {', '.join(dd)})")
    return dd[split]
