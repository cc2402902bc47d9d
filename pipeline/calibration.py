"""Calibration sets: blocks of token ids drawn from hub datasets, local files or the embedded corpus.

A set is ``num_samples`` sequences of ``seq_len`` token ids. Its sources are mixed by weight (each
source contributes a share of the blocks proportional to its weight; a corpus source shares its
part equally among its domains). With packing, a source's documents, in a seeded random order, are
concatenated with the tokenizer's end-of-text token between them and cut into fixed-length blocks
(the paper's C4 setting); without packing, every block is a random window of one document that is
long enough to fill it. The blocks of all sources are then shuffled together.

Each set is saved as ``<name>.safetensors`` (``input_ids`` int64 ``[num_samples, seq_len]``) plus
``<name>.json``, a manifest with the sources, their dataset fingerprints, the token count and the seed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import CalibrationSet, CorpusSource, HubSource, LocalSource
from pipeline.errors import PipelineError
from pipeline.io import load_tensors, read_json, save_tensors, sha256_bytes, write_json

log = logging.getLogger(__name__)

#: Documents tokenised per call to the tokenizer.
TOKENIZE_BATCH = 64
#: Above this many rows, documents are drawn by random index instead of a full permutation.
PERMUTE_LIMIT = 10_000_000
#: Shuffle buffer of streamed hub datasets.
STREAM_BUFFER = 10_000
LOCAL_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt"}


@dataclass
class TextSource:
    """The documents of one source (one domain, for a corpus source) and what the manifest records."""

    key: str
    weight: float
    record: dict[str, Any]
    dataset: Any  # datasets.Dataset or datasets.IterableDataset
    text_field: str
    rows: Any = None  # row indices to draw from (corpus domains); None = every row

    def documents(self, rng: np.random.Generator) -> Iterator[str]:
        """The non-empty texts of the source, in a random order fixed by ``rng``."""
        if _is_iterable_dataset(self.dataset):
            stream = self.dataset.shuffle(seed=int(rng.integers(2**32)), buffer_size=STREAM_BUFFER)
            for example in stream:
                yield from _texts([example.get(self.text_field, _MISSING)], self.key, self.text_field)
            return
        column_ds = self.dataset.select_columns([self.text_field])
        for idx in _batched(_random_order(self.rows, len(self.dataset), rng), TOKENIZE_BATCH):
            yield from _texts(list(column_ds[idx][self.text_field]), self.key, self.text_field)


_MISSING = object()


def _texts(values: Sequence[Any], key: str, field: str) -> Iterator[str]:
    for value in values:
        if value is _MISSING:
            raise PipelineError(f"{key}.text_field: the dataset has no field {field!r}")
        if value is None:
            continue
        if not isinstance(value, str):
            raise PipelineError(f"{key}.text_field: field {field!r} holds {type(value).__name__} values, not text")
        if value.strip():
            yield value


def _is_iterable_dataset(ds: Any) -> bool:
    from datasets import IterableDataset

    return isinstance(ds, IterableDataset)


def _random_order(rows: np.ndarray | None, n: int, rng: np.random.Generator) -> Iterator[int]:
    """Every row (or every index in ``rows``) once, in random order, without materialising huge permutations."""
    if rows is not None:
        yield from (int(i) for i in rows[rng.permutation(len(rows))])
        return
    if n <= PERMUTE_LIMIT:
        yield from (int(i) for i in rng.permutation(n))
        return
    seen: set[int] = set()
    while len(seen) < n:
        i = int(rng.integers(n))
        if i not in seen:
            seen.add(i)
            yield i


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- opening sources -------------------------------------------------------------------------------
def _check_text_column(ds: Any, key: str, field: str, what: str) -> None:
    names = getattr(ds, "column_names", None)
    if names is None:  # a streamed dataset without declared features: checked on the first example
        return
    if field not in names:
        raise PipelineError(f"{key}.text_field: {what} has no column {field!r} (columns: {', '.join(names) or 'none'})")
    feature = ds.features[field] if ds.features is not None else None
    dtype = getattr(feature, "dtype", None)
    if dtype is not None and dtype not in ("string", "large_string"):
        raise PipelineError(f"{key}.text_field: column {field!r} of {what} holds {dtype}, not text")


def _fingerprint_of(ds: Any) -> str | None:
    return getattr(ds, "_fingerprint", None)


def open_corpus_source(spec: CorpusSource, key: str, corpus_dir: str | os.PathLike[str]) -> list[TextSource]:
    """One :class:`TextSource` per domain of the embedded corpus, sharing the source's weight equally."""
    from datasets import DatasetDict, load_from_disk

    path = Path(corpus_dir)
    if not path.is_dir():
        raise PipelineError(f"{key}: corpus {path} does not exist; run the corpus stage first (dvc repro corpus)")
    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise PipelineError(f"{key}: corpus {path} cannot be read ({exc}); rerun the corpus stage") from None
    if not isinstance(data, DatasetDict) or spec.split not in data:
        found = ", ".join(data) if isinstance(data, DatasetDict) else "none"
        raise PipelineError(f"{key}.split: corpus {path} has no split {spec.split!r} (splits: {found})")
    ds = data[spec.split]
    for column in ("text", "domain"):
        if column not in ds.column_names:
            raise PipelineError(f"{key}: corpus {path} has no column {column!r}; rerun the corpus stage")
    domains = np.asarray(list(ds["domain"]), dtype=object)
    present = sorted(set(domains.tolist()))
    out: list[TextSource] = []
    for domain in spec.domains:
        rows = np.flatnonzero(domains == domain)
        if len(rows) == 0:
            raise PipelineError(
                f"{key}.domains: domain {domain!r} has no documents in the corpus {spec.split} split "
                f"(domains present: {', '.join(present) or 'none'})"
            )
        record = {
            "type": "corpus",
            "path": str(path),
            "split": spec.split,
            "domain": domain,
            "rows": int(len(rows)),
            "dataset_fingerprint": _fingerprint_of(ds),
        }
        out.append(TextSource(key, spec.weight / len(spec.domains), record, ds, "text", rows))
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _hub_offline() -> bool:
    from datasets import config as ds_config

    return bool(getattr(ds_config, "HF_HUB_OFFLINE", False)) or os.environ.get("HF_DATASETS_OFFLINE") == "1"


def open_hub_source(spec: HubSource, key: str, cache_dir: str | None = None) -> list[TextSource]:
    """A hub dataset, from the local cache when offline; not cached while offline is a one-line error."""
    import datasets

    kwargs: dict[str, Any] = {"split": spec.split, "revision": spec.revision, "streaming": spec.streaming}
    if spec.data_files:
        kwargs["data_files"] = list(spec.data_files)
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    try:
        ds = datasets.load_dataset(spec.id, spec.config, **kwargs)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        if _hub_offline():
            raise PipelineError(
                f"{key}.id: hub dataset {spec.id!r} is not in the local cache and downloads are disabled "
                f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); download it once online or use a local file source "
                f"({_first_line(exc)})"
            ) from None
        raise PipelineError(f"{key}.id: cannot load hub dataset {spec.id!r} ({_first_line(exc)})") from None
    if isinstance(ds, dict):
        raise PipelineError(f"{key}.split: give one split of {spec.id!r} (found: {', '.join(ds)})")
    _check_text_column(ds, key, spec.text_field, f"hub dataset {spec.id!r}")
    record = {
        "type": "hub",
        "id": spec.id,
        "config": spec.config,
        "split": spec.split,
        "revision": spec.revision,
        "data_files": list(spec.data_files) if spec.data_files else None,
        "text_field": spec.text_field,
        "streaming": spec.streaming,
        "rows": None if spec.streaming else len(ds),
        "dataset_fingerprint": None if spec.streaming else _fingerprint_of(ds),
    }
    return [TextSource(key, spec.weight, record, ds, spec.text_field)]


def local_format(spec: LocalSource, key: str) -> str:
    """The file format of a local source (from its suffix when ``format`` is ``auto``)."""
    if spec.format != "auto":
        return spec.format
    suffix = Path(spec.path).suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise PipelineError(f"{key}.format: cannot tell the format of {spec.path} from its suffix; set jsonl, json, parquet or txt")
    return LOCAL_FORMATS[suffix]


def open_local_source(spec: LocalSource, key: str, cache_dir: str | None = None) -> list[TextSource]:
    """A local jsonl, json, parquet or txt file (txt: one document per blank-line separated paragraph)."""
    import datasets

    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise PipelineError(f"{key}.path: {path} does not exist")
    fmt = local_format(spec, key)
    if path.stat().st_size == 0:
        raise PipelineError(f"{key}.path: {path} is empty (no documents to calibrate on)")
    builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "txt": "text"}[fmt]
    kwargs: dict[str, Any] = {"data_files": str(path.resolve()), "split": "train"}
    if fmt == "txt":
        kwargs["sample_by"] = "paragraph"
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    try:
        ds = datasets.load_dataset(builder, **kwargs)
    except Exception as exc:  # malformed files surface as assorted arrow/json/datasets errors
        raise PipelineError(f"{key}.path: cannot read {path} as {fmt} ({_first_line(exc)})") from None
    field = "text" if fmt == "txt" else spec.text_field
    _check_text_column(ds, key, field, str(path))
    record = {
        "type": "local",
        "path": str(path),
        "format": fmt,
        "text_field": field,
        "rows": len(ds),
        "file_sha256": _file_sha256(path),
        "dataset_fingerprint": _fingerprint_of(ds),
    }
    return [TextSource(key, spec.weight, record, ds, field)]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def open_sources(
    spec: CalibrationSet, set_key: str, corpus_dir: str | os.PathLike[str], cache_dir: str | None = None
) -> list[TextSource]:
    """Every source of a set, opened (corpus sources expand to one entry per domain)."""
    out: list[TextSource] = []
    for j, source in enumerate(spec.sources):
        key = f"{set_key}.sources[{j}]"
        if isinstance(source, CorpusSource):
            out.extend(open_corpus_source(source, key, corpus_dir))
        elif isinstance(source, HubSource):
            out.extend(open_hub_source(source, key, cache_dir))
        else:
            out.extend(open_local_source(source, key, cache_dir))
    return out


# -- building blocks -------------------------------------------------------------------------------
def allocate(num_samples: int, weights: Sequence[float]) -> list[int]:
    """Split ``num_samples`` blocks among sources in proportion to ``weights`` (largest remainder)."""
    total = float(sum(weights))
    exact = [num_samples * w / total for w in weights]
    counts = [int(np.floor(e)) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: num_samples - sum(counts)]:
        counts[i] += 1
    return counts


def separator_token(tokenizer: Any) -> int | None:
    """The token placed between packed documents: end-of-text, else beginning-of-text, else none."""
    for attr in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return None


def _token_docs(source: TextSource, tokenizer: Any, rng: np.random.Generator) -> Iterator[tuple[str, list[int]]]:
    for batch in _batched(source.documents(rng), TOKENIZE_BATCH):
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        yield from zip(batch, ids, strict=True)


def pack_blocks(
    source: TextSource, tokenizer: Any, n_blocks: int, seq_len: int, rng: np.random.Generator, sep: int | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Concatenate documents (``sep`` after each) and cut ``n_blocks`` blocks of ``seq_len`` tokens."""
    need = n_blocks * seq_len
    buf: list[int] = []
    digest = hashlib.sha256()
    docs = 0
    for text, ids in _token_docs(source, tokenizer, rng):
        if not ids:
            continue
        digest.update(text.encode("utf-8"))
        docs += 1
        buf.extend(ids)
        if sep is not None:
            buf.append(sep)
        if len(buf) >= need:
            break
    if docs == 0:
        raise _no_documents(source)
    if len(buf) < seq_len:
        raise PipelineError(
            f"{source.key}: {_describe(source)} has only {len(buf)} tokens, too short to fill one block of "
            f"seq_len={seq_len}; add text or lower seq_len"
        )
    if len(buf) < need:
        raise PipelineError(
            f"{source.key}: {_describe(source)} has {len(buf)} tokens, enough for {len(buf) // seq_len} of the "
            f"{n_blocks} blocks of seq_len={seq_len} it must supply; add text, lower num_samples or seq_len"
        )
    blocks = np.asarray(buf[:need], dtype=np.int64).reshape(n_blocks, seq_len)
    return blocks, {"documents": docs, "content_sha256": digest.hexdigest()}


def window_blocks(
    source: TextSource, tokenizer: Any, n_blocks: int, seq_len: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """One random window of ``seq_len`` tokens from each of ``n_blocks`` documents long enough to hold it."""
    rows: list[list[int]] = []
    digest = hashlib.sha256()
    longest = 0
    seen = 0
    for text, ids in _token_docs(source, tokenizer, rng):
        seen += 1
        longest = max(longest, len(ids))
        if len(ids) < seq_len:
            continue
        start = int(rng.integers(0, len(ids) - seq_len + 1))
        rows.append(ids[start : start + seq_len])
        digest.update(text.encode("utf-8"))
        if len(rows) == n_blocks:
            break
    if seen == 0:
        raise _no_documents(source)
    if not rows:
        raise PipelineError(
            f"{source.key}: no document of {_describe(source)} reaches seq_len={seq_len} tokens (longest: {longest}), "
            f"too short to fill one block; set packing: true or lower seq_len"
        )
    if len(rows) < n_blocks:
        raise PipelineError(
            f"{source.key}: only {len(rows)} documents of {_describe(source)} have seq_len={seq_len} tokens, "
            f"{n_blocks} needed without packing; set packing: true, or lower num_samples or seq_len"
        )
    return np.asarray(rows, dtype=np.int64), {"documents": len(rows), "content_sha256": digest.hexdigest()}


def _no_documents(source: TextSource) -> PipelineError:
    return PipelineError(
        f"{source.key}: {_describe(source)} has no non-empty text in field {source.text_field!r} (0 samples to draw from)"
    )


def _describe(source: TextSource) -> str:
    rec = source.record
    if rec["type"] == "corpus":
        return f"corpus domain {rec['domain']!r} ({rec['split']})"
    if rec["type"] == "hub":
        return f"hub dataset {rec['id']!r}"
    return f"file {rec['path']}"


def _rng(seed: int, name: str, *extra: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode("utf-8")), *extra]))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's vocabulary, merges and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = repr(sorted(tokenizer.get_vocab().items()))
    specials = repr(sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items()))
    return sha256_bytes((text + specials).encode("utf-8"))[:16]


def input_ids_fingerprint(input_ids: torch.Tensor) -> str:
    """A short hash of the token ids and their shape (identifies a calibration set's content)."""
    data = input_ids.to(torch.int64).contiguous().numpy().tobytes()
    return sha256_bytes(repr(tuple(input_ids.shape)).encode() + data)[:16]


def check_seq_len(name: str, spec: CalibrationSet, max_positions: int | None) -> None:
    """A set's shape must be non-empty and fit the model's position range."""
    set_key = f"calibration.sets.{name}"
    if spec.num_samples < 1:
        raise PipelineError(f"{set_key}.num_samples: must be at least 1 (got {spec.num_samples})")
    if max_positions is not None and spec.seq_len > max_positions:
        raise PipelineError(f"{set_key}.seq_len: {spec.seq_len} exceeds the model's max_position_embeddings={max_positions}")


def build_set(
    name: str,
    spec: CalibrationSet,
    tokenizer: Any,
    *,
    seed: int,
    corpus_dir: str | os.PathLike[str],
    max_positions: int | None = None,
    cache_dir: str | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The ``input_ids`` ``[num_samples, seq_len]`` of one set and its manifest (nothing is written)."""
    set_key = f"calibration.sets.{name}"
    check_seq_len(name, spec, max_positions)
    sources = open_sources(spec, set_key, corpus_dir, cache_dir)
    counts = allocate(spec.num_samples, [s.weight for s in sources])
    sep = separator_token(tokenizer)
    blocks: list[np.ndarray] = []
    origin: list[int] = []
    records: list[dict[str, Any]] = []
    for k, (source, n) in enumerate(zip(sources, counts, strict=True)):
        record = {"key": source.key, "weight": source.weight, **source.record, "samples": n}
        if n > 0:
            rng = _rng(seed, name, k)
            if spec.packing:
                got, stats = pack_blocks(source, tokenizer, n, spec.seq_len, rng, sep)
            else:
                got, stats = window_blocks(source, tokenizer, n, spec.seq_len, rng)
            blocks.append(got)
            origin.extend([k] * n)
            record.update(stats)
            if record.get("dataset_fingerprint") is None:
                record["dataset_fingerprint"] = stats["content_sha256"][:16]
        else:
            log.warning("%s: weight too small for any of the %d samples; source unused", source.key, spec.num_samples)
            record.update({"documents": 0, "content_sha256": None})
        records.append(record)
    order = _rng(seed, name, len(sources), 2**31 - 1).permutation(spec.num_samples)
    input_ids = torch.from_numpy(np.concatenate(blocks)[order].copy())
    manifest = {
        "name": name,
        "num_samples": spec.num_samples,
        "seq_len": spec.seq_len,
        "num_tokens": int(input_ids.numel()),
        "packing": spec.packing,
        "seed": seed,
        "separator_token_id": sep if spec.packing else None,
        "sources": records,
        "sample_sources": [origin[i] for i in order.tolist()],
        "tokenizer": {
            "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
        },
        "fingerprint": input_ids_fingerprint(input_ids),
    }
    return input_ids, manifest


#: File names inside one calibration set's folder.
TOKENS_FILE, MANIFEST_FILE = "input_ids.safetensors", "manifest.json"


def write_calibration_set(out_dir: str | os.PathLike[str], input_ids: torch.Tensor, manifest: dict[str, Any]) -> None:
    """Write one set's tokens and manifest into ``out_dir`` (read back by :func:`load_calibration_set`)."""
    out = Path(out_dir)
    save_tensors(out / TOKENS_FILE, {"input_ids": input_ids})
    write_json(out / MANIFEST_FILE, manifest)
    log.info("calibration set %s: %d x %d tokens from %d sources", manifest["name"], *input_ids.shape, len(manifest["sources"]))


@dataclass(frozen=True)
class CalibrationData:
    """A calibration set read back from disk."""

    name: str
    input_ids: torch.Tensor
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        """Hash of the token ids (recorded by downstream stages)."""
        return str(self.manifest["fingerprint"])


def load_calibration_set(directory: str | os.PathLike[str], name: str, key: str = "search.calibration") -> CalibrationData:
    """Read set ``name`` from its folder (the calibration stage's output for that set), checked against its manifest."""
    root = Path(directory)
    tensors_path, manifest_path = root / TOKENS_FILE, root / MANIFEST_FILE
    if not manifest_path.is_file() or not tensors_path.is_file():
        raise PipelineError(
            f"{key}: calibration set {name!r} is not built ({tensors_path} is missing); "
            f"check calibration.sets.{name} and run dvc repro calibration@{name}"
        )
    manifest = read_json(manifest_path, what="calibration manifest")
    tensors = load_tensors(tensors_path, what="calibration set")
    ids = tensors.get("input_ids")
    if ids is None or ids.dtype != torch.int64 or ids.dim() != 2:
        raise PipelineError(f"{tensors_path}: expected an int64 [num_samples, seq_len] tensor 'input_ids'; rerun dvc repro calibration@{name}")
    if input_ids_fingerprint(ids) != manifest.get("fingerprint"):
        raise PipelineError(f"{tensors_path}: content does not match {manifest_path}; rerun dvc repro calibration@{name}")
    return CalibrationData(name=name, input_ids=ids, manifest=manifest)


__all__ = [
    "CalibrationData",
    "TextSource",
    "allocate",
    "build_set",
    "input_ids_fingerprint",
    "load_calibration_set",
    "open_sources",
    "pack_blocks",
    "tokenizer_fingerprint",
    "window_blocks",
    "write_calibration_set",
]
