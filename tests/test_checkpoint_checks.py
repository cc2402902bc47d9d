"""The model stage's checkpoint check: missing, partial or truncated weights and a tokenizer larger
than the embedding are one-line errors, from the index and tensor headers alone."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.models.loading import INDEX_FILE, SINGLE_FILE, check_checkpoint, load_config, model_skeleton, safetensors_shapes
from pipeline.train import adopt_source_model
from tests.factory import TINY_CONFIGS, save_tiny_checkpoint, tiny_tokenizer

#: Small enough that the tiny Mixtral (about 0.4 MB) is saved as several shards plus an index.
SHARD_SIZE = "100KB"


def check(path: Path) -> None:
    check_checkpoint(path, model_skeleton(load_config(path)))


def shards(path: Path) -> list[str]:
    """The shard files an index names, sorted."""
    return sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))


# -- checkpoints that pass ------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_a_complete_checkpoint_of_every_family_passes(tmp_path: Path, model_type: str) -> None:
    check(save_tiny_checkpoint(tmp_path / model_type, model_type))


def test_a_complete_sharded_checkpoint_passes(tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path / "sharded", max_shard_size=SHARD_SIZE)
    assert (path / INDEX_FILE).is_file() and len(shards(path)) > 1
    check(path)


def test_tokenizer_smaller_than_the_embedding_passes(tmp_path: Path) -> None:
    check(save_tiny_checkpoint(tmp_path / "tiny", vocab=384))


def test_shapes_come_from_the_header(tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path / "tiny")
    assert safetensors_shapes(path / SINGLE_FILE)["model.embed_tokens.weight"] == (320, 32)


# -- checkpoints that fail: each breaks a tiny Mixtral (320-row embedding, 21 parameters) ---------------------
Values = dict[str, object]


def _no_weights(path: Path) -> Values:
    (path / SINGLE_FILE).unlink()
    return {}


def _no_index(path: Path) -> Values:
    (path / INDEX_FILE).unlink()
    return {}


def _missing_shard(path: Path) -> Values:
    names = shards(path)
    (path / names[-1]).unlink()
    return {"count": len(names), "shard": names[-1]}


def _edit_index(path: Path, change: Callable[[dict[str, str]], object]) -> None:
    doc = json.loads((path / INDEX_FILE).read_text())
    change(doc["weight_map"])
    (path / INDEX_FILE).write_text(json.dumps(doc))


def _index_without_attention(path: Path) -> Values:
    _edit_index(path, lambda wm: [wm.pop(k) for k in [k for k in wm if k.startswith("model.layers.1.self_attn.")]])
    return {}


def _tensor_moved_to_another_shard(path: Path) -> Values:
    first, second = shards(path)[:2]

    def move(wm: dict[str, str]) -> None:
        wm[next(k for k, f in wm.items() if f == first)] = second

    _edit_index(path, move)
    return {"shard": second}


def _single_file_without_norm(path: Path) -> Values:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / SINGLE_FILE))
    del tensors["model.norm.weight"]
    save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
    return {}


def _bin_index_missing_a_shard(path: Path) -> Values:
    (path / SINGLE_FILE).unlink()
    first, second = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": first, "lm_head.weight": second}}))
    (path / first).write_bytes(b"")
    return {}


def _cut(file: Path, size: int) -> Values:
    """Keep the first ``size`` bytes of ``file``."""
    full = file.stat().st_size
    file.write_bytes(file.read_bytes()[:size])
    return {"full": full, "size": size, "name": file.name}


def _extend(path: Path) -> Values:
    with open(path / SINGLE_FILE, "ab") as fh:
        fh.write(b"\0" * 16)
    return {}


def _oversized_tokenizer(path: Path) -> Values:
    tokenizer = tiny_tokenizer(320)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(328 - len(tokenizer))])  # 8 past the 320 rows
    tokenizer.save_pretrained(path)
    return {}


def _bin_weights_and_a_larger_tokenizer(path: Path) -> Values:
    (path / SINGLE_FILE).rename(path / "pytorch_model.bin")  # .bin weights are never opened
    tiny_tokenizer(320).save_pretrained(path)  # about 310 entries, the model is saved with 288 rows
    return {}


@dataclass(frozen=True)
class Broken:
    """A tiny Mixtral checkpoint (sharded: several files plus an index), broken by ``damage``, and the error it
    must give (``{name}`` stands for the values ``damage`` returns, and ``{path}`` for the checkpoint)."""

    id: str
    damage: Callable[[Path], Values]
    expected: str
    sharded: bool = False
    vocab: int = 320


BROKEN = [
    Broken("no-weight-files", _no_weights, r"model\.source: checkpoint {path} has no weights: none of model\.safetensors, model\.safetensors\.index\.json, pytorch_model\.bin, pytorch_model\.bin\.index\.json is there"),
    Broken("shards-without-an-index", _no_index, r"model\.source: checkpoint {path} has no weights: .*; it holds \d+ other \.safetensors files \(model-00001-of-\d+\.safetensors, \.\.\.\) but no index naming them", sharded=True),
    Broken("index-naming-a-missing-shard", _missing_shard, r"model\.source: checkpoint index {path}/model\.safetensors\.index\.json names {count} shard files, 1 of them missing from {path}: {shard}", sharded=True),
    Broken("index-not-covering-the-parameters", _index_without_attention, r"model\.source: the weights of {path} \(model\.safetensors\.index\.json\) leave 4 of the model's 21 parameters without a tensor: model\.layers\.1\.self_attn\.\w+_proj\.weight, .*", sharded=True),
    Broken("shard-lacking-a-tensor-its-index-assigns-to-it", _tensor_moved_to_another_shard, r"model\.source: checkpoint file {path}/{shard} lacks 1 of the \d+ tensors model\.safetensors\.index\.json assigns to it \(e\.g\. .+\)", sharded=True),
    Broken("single-file-not-covering-the-parameters", _single_file_without_norm, r"model\.source: the weights of {path} \(model\.safetensors\) leave 1 of the model's 21 parameters without a tensor: model\.norm\.weight"),
    Broken("bin-index-naming-a-missing-shard", _bin_index_missing_a_shard, r"model\.source: checkpoint index {path}/pytorch_model\.bin\.index\.json names 2 shard files, 1 of them missing from {path}: pytorch_model-00002-of-00002\.bin"),
    Broken("truncated-tensor-data", lambda p: _cut(p / SINGLE_FILE, 200_000), r"model\.source: checkpoint file {path}/model\.safetensors is truncated: its header describes {full} bytes \(\d+-byte header, \d+ bytes of tensors\), the file holds 200000"),
    Broken("truncated-header", lambda p: _cut(p / shards(p)[0], 100), r"model\.source: checkpoint file {path}/{name} is truncated: its header alone is \d+ bytes, the file holds 100", sharded=True),
    Broken("shorter-than-the-header-length", lambda p: _cut(p / SINGLE_FILE, 4), r"model\.source: checkpoint file {path}/model\.safetensors is truncated: 4 bytes, less than the 8-byte header length"),
    Broken("data-past-the-tensors", _extend, r"model\.source: checkpoint file {path}/model\.safetensors is corrupt: its header describes \d+ bytes .*, the file holds \d+"),
    Broken("tokenizer-larger-than-the-embedding", _oversized_tokenizer, r"model\.source: the tokenizer in {path} has 328 entries \(added tokens included\) but the model's input embedding has 320 rows \(model\.embed_tokens\.weight in model\.safetensors\); token ids 320 to 327 would index past it"),
    Broken("tokenizer-against-the-config-vocab-size", _bin_weights_and_a_larger_tokenizer, r"model\.source: the tokenizer in {path} has \d+ entries \(added tokens included\) but the model's input embedding has 288 rows \(vocab_size in config\.json\); token ids 288 to \d+ would index past it", vocab=288),
]


@pytest.mark.parametrize("case", BROKEN, ids=[c.id for c in BROKEN])
def test_a_broken_checkpoint_is_one_line_naming_file_and_sizes(tmp_path: Path, case: Broken) -> None:
    path = save_tiny_checkpoint(tmp_path / "ckpt", max_shard_size=SHARD_SIZE if case.sharded else None, vocab=case.vocab)
    values: Values = {"path": path, **case.damage(path)}
    pattern = case.expected
    for name, value in values.items():
        pattern = pattern.replace(f"{{{name}}}", re.escape(str(value)))
    with pytest.raises(PipelineError) as err:
        check(path)
    assert re.fullmatch(pattern, str(err.value)), str(err.value)


# -- through adopt_source_model (what the model stage calls) ----------------------------------------------------
def test_adopting_a_checkpoint_without_weights_writes_nothing(tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path / "tiny")
    (path / SINGLE_FILE).unlink()
    with pytest.raises(PipelineError, match=r"model\.source: checkpoint .* has no weights"):
        adopt_source_model(str(path), "main", tmp_path / "out" / "checkpoint")
    assert not (tmp_path / "out").exists()
