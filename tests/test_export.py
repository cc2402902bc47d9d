"""Export: physical expert removal, equivalence with the search's Z_hat(S), atomic checkpoints."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.export import Selection, export_pruned, validate_selection
from pipeline.models.outputs import search_output
from pipeline.models import get_adapter, supported_model_types
from pipeline.models.mixtral import MixtralAdapter
from pipeline.streaming import stream_layers
from tests.factory import TINY_CONFIGS, tiny_model, tiny_tokenizer

MODEL_TYPES = [t for t in sorted(TINY_CONFIGS) if t in supported_model_types()]


def calibration_ids(n: int = 4, length: int = 24, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def cached_inputs(model: nn.Module, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every MoE block's input ``[N, L, d]``, as the activations stage caches it."""
    adapter = get_adapter(model.config)
    out = {}
    for step in stream_layers(model, adapter, ids, batch_size=2, device=torch.device("cpu"), progress=False):
        if step.block is not None:
            out[step.index] = torch.cat(step.moe_input)
    return out


def selection_dict(model: nn.Module, r: int, seed: int = 0, **overrides) -> dict:
    """A selection in the documented selection.json format, random kept sets of size ``r``."""
    adapter = get_adapter(model.config)
    n, k = adapter.num_experts(model.config), adapter.top_k(model.config)
    rng = random.Random(seed)
    layers = [
        {"layer": i, "kept": sorted(rng.sample(range(n), r)), "loss": rng.random(), "candidates_evaluated": 1,
         "baselines": {"frequency": {"kept": list(range(r)), "loss": 2.0}}}
        for i in adapter.moe_layer_indices(model)
    ]
    data = {"strategy": "enumerate", "mode": "layerwise", "r": r, "calibration": "general",
            "model_fingerprint": "abc123", "num_experts": n, "top_k": k, "layers": layers}
    data.update(overrides)
    return data


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def load(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False).eval()


# -- identity and round trip -------------------------------------------------------------------------
def test_identity_selection_exports_bit_identical_logits(tmp_path: Path) -> None:
    ids = calibration_ids()
    original = tiny_model()
    model = tiny_model()
    adapter = get_adapter(model.config)
    report = export_pruned(model, adapter, Selection.identity(model, adapter), tmp_path / "model", progress=False)
    loaded = load(tmp_path / "model")
    assert torch.equal(logits(loaded, ids), logits(original, ids))
    assert report.params_after == report.params_before
    assert loaded.config.kept_experts == {str(i): list(range(8)) for i in range(2)}


def test_round_trip_and_checkpoint_contents(tmp_path: Path) -> None:
    ids = calibration_ids()
    model = tiny_model()
    adapter = get_adapter(model.config)
    data = selection_dict(model, r=5, seed=3)
    selection = Selection.from_dict(data, origin="selection.json")
    out = tmp_path / "model"
    report = export_pruned(
        model, adapter, selection, out, tokenizer=tiny_tokenizer(), source="tiny", max_shard_size="60KB", progress=False
    )
    loaded = load(out)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 5 and config["num_experts_per_tok"] == 2
    assert config["kept_experts"] == {str(e["layer"]): e["kept"] for e in data["layers"]}
    assert config["pruning"]["selection_sha256"] == selection.sha256
    assert config["pruning"]["strategy"] == "enumerate" and config["pruning"]["r"] == 5
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out))("12 + 35")["input_ids"] == tiny_tokenizer()("12 + 35")["input_ids"]
    card = (out / "README.md").read_text()
    for layer, ids_kept in selection.kept.items():
        assert f"| {layer} | {ids_kept} |" in card
    assert "enumerate" in card and selection.sha256 in card
    # Size arithmetic: each dropped expert removes gate/up/down (3 d f) and one router row (d).
    d, f, dropped = 32, 48, 8 - 5
    removed = 2 * dropped * (3 * d * f + d)
    assert report.params_before - report.params_after == removed
    assert report.bytes_before - report.bytes_after == 4 * removed
    assert report.metrics()["param_reduction"] == pytest.approx(removed / report.params_before)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_exported_block_equals_search_zhat(tmp_path: Path, model_type: str) -> None:
    """The loaded checkpoint's MoE blocks compute what the search scored (Z_hat(S)) on cached inputs."""
    ids = calibration_ids()
    original = tiny_model(model_type)
    adapter = get_adapter(original.config)
    xs = cached_inputs(original, ids)
    n, k = adapter.num_experts(original.config), adapter.top_k(original.config)
    selection = Selection.from_dict(selection_dict(original, r=max(k, n - 3), seed=1))
    model = tiny_model(model_type)
    report = export_pruned(model, adapter, selection, tmp_path / "m", inputs=xs.__getitem__, progress=False)
    assert report.checks and max(c.rel_error for c in report.checks) < 1e-5
    loaded = load(tmp_path / "m")
    for i, layer in enumerate(adapter.decoder_layers(loaded)):
        block = adapter.moe_block(layer)
        if block is None:
            continue
        x = xs[i].reshape(-1, xs[i].shape[-1])
        original_block = adapter.moe_block(adapter.decoder_layers(original)[i])
        expected = search_output(adapter, original_block, original.config, x, selection.kept[i])
        with torch.no_grad():
            got = adapter.block_output(block, x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert adapter.block_num_experts(block) == selection.r


def test_equivalence_check_fails_when_search_routing_differs(tmp_path: Path) -> None:
    """A search that scores another routing than the exported model runs is caught, nothing written."""

    class IgnoresKept(MixtralAdapter):
        model_types = ()

        def route(self, block, logits, config, kept=None):
            return super().route(block, logits, config, None)

    model = tiny_model()
    xs = cached_inputs(tiny_model(), calibration_ids())
    selection = Selection.from_dict(selection_dict(model, r=4, seed=2))
    with pytest.raises(PipelineError, match=r"layer 0: .*Z_hat\(S\)") as err:
        export_pruned(model, IgnoresKept(), selection, tmp_path / "m", inputs=xs.__getitem__, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())


# -- bad inputs: one clear error, nothing written -----------------------------------------------------
BAD = {
    "other model": ({"model_fingerprint": "ffff0000"}, r"made for model ffff0000"),
    "fewer layers": ({"layers": "drop-last"}, r"lists MoE layers \[0\].*\[0, 1\]"),
    "more layers": ({"layers": "add-one"}, r"lists MoE layers \[0, 1, 2\]"),
    "other expert count": ({"num_experts": 16}, r"made for 16 experts"),
    "r below top_k": ({"r": 1}, r"r=1 is below the model's top_k=2"),
    "id out of range": ({"layers": "out-of-range"}, r"layer 0: kept ids .* in 0..7"),
    "duplicate ids": ({"layers": "duplicate"}, r"layer 0: kept ids .* distinct"),
    "wrong kept size": ({"layers": "short"}, r"layer 1 keeps 3 experts, expected r=4"),
}


def _bad_selection(model: nn.Module, case: str) -> dict:
    change, _ = BAD[case]
    data = selection_dict(model, r=4)
    layers = data["layers"]
    how = change.get("layers")
    if how == "drop-last":
        data["layers"] = layers[:1]
    elif how == "add-one":
        data["layers"] = [*layers, {"layer": 2, "kept": [0, 1, 2, 3]}]
    elif how == "out-of-range":
        layers[0]["kept"] = [0, 1, 2, 8]
    elif how == "duplicate":
        layers[0]["kept"] = [0, 1, 1, 2]
    elif how == "short":
        layers[1]["kept"] = [0, 1, 2]
    else:
        data.update(change)
    if case == "r below top_k":
        for entry in data["layers"]:
            entry["kept"] = entry["kept"][:1]
    return data


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_selection_is_one_line_error_and_nothing_written(tmp_path: Path, case: str) -> None:
    model = tiny_model()
    adapter = get_adapter(model.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "selection.json"
    path.write_text(json.dumps(_bad_selection(model, case)))
    with pytest.raises(PipelineError, match=BAD[case][1]) as err:
        export_pruned(model, adapter, Selection.load(path), tmp_path / "out", source_fingerprint="abc123", progress=False)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert not (tmp_path / "out").exists()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_malformed_selection_file(tmp_path: Path) -> None:
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"r": 4, "num_experts": 8, "layers": []}))
    with pytest.raises(PipelineError, match=r"selection.json: missing key 'top_k'"):
        Selection.load(path)
    path.write_text("{not json")
    with pytest.raises(PipelineError, match=r"not valid JSON"):
        Selection.load(path)


def test_validate_selection_against_manifest_facts() -> None:
    model = tiny_model()
    selection = Selection.from_dict(selection_dict(model, r=4), origin="outputs/search/selection.json")
    validate_selection(selection, moe_layers=[0, 1], num_experts=8, top_k=2, fingerprint="abc123")
    with pytest.raises(PipelineError, match=r"top_k=2, the model routes to 3"):
        validate_selection(selection, moe_layers=[0, 1], num_experts=8, top_k=3)


# -- atomic output directory ------------------------------------------------------------------------
def test_half_written_output_directory_is_replaced_atomically(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "model-00001-of-00003.safetensors").write_bytes(b"\x00" * 100)  # left by a crash
    (out / "config.json").write_text("{")
    stale = tmp_path / "model.tmp-0badc0de"
    stale.mkdir()
    (stale / "junk").write_text("x")
    model = tiny_model()
    adapter = get_adapter(model.config)
    report = export_pruned(model, adapter, Selection.from_dict(selection_dict(model, r=6)), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == report.files
    assert "model-00001-of-00003.safetensors" not in report.files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert load(out).config.num_local_experts == 6


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "model"
    model = tiny_model()
    adapter = get_adapter(model.config)
    export_pruned(model, adapter, Selection.from_dict(selection_dict(model, r=6)), out, progress=False)
    previous = {p.name: p.read_bytes() for p in out.iterdir()}

    class DiskFullTokenizer:
        def save_pretrained(self, path):
            (Path(path) / "tokenizer.json").write_text("{")
            raise OSError(28, "No space left on device")

    model = tiny_model()
    with pytest.raises(PipelineError, match="no space left on device"):
        export_pruned(
            model,
            adapter,
            Selection.from_dict(selection_dict(model, r=5)),
            out,
            tokenizer=DiskFullTokenizer(),
            progress=False,
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# -- experts stored as a module list ------------------------------------------------------------------
class _ListExpert(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)


class _ListBlock(nn.Module):
    """An MoE block of the older transformers layout: router Linear + ModuleList of experts."""

    def __init__(self, config) -> None:
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList(_ListExpert(config.hidden_size, 6) for _ in range(config.num_local_experts))


def test_prune_block_with_module_list_experts() -> None:
    torch.manual_seed(0)
    config = SimpleNamespace(hidden_size=4, num_local_experts=5, num_experts_per_tok=2)
    block = _ListBlock(config)
    adapter = MixtralAdapter()
    kept = [0, 2, 4]
    new = adapter.prune_block(block, kept, SimpleNamespace(hidden_size=4, num_local_experts=3, num_experts_per_tok=2), 0)
    assert len(new.experts) == 3
    assert torch.equal(new.gate.weight, block.gate.weight[kept])
    for j, e in enumerate(kept):
        assert torch.equal(new.experts[j].w1.weight, block.experts[e].w1.weight)
        assert torch.equal(new.experts[j].w2.weight, block.experts[e].w2.weight)


def test_repruning_records_original_ids_and_the_chain(tmp_path: Path) -> None:
    """Pruning an export twice: kept_experts stays in the original model's ids; the card shows each step."""
    ids = calibration_ids()
    original = tiny_model()
    adapter = get_adapter(original.config)
    first = Selection.from_dict(selection_dict(original, r=6, seed=1), origin="first")
    model = tiny_model()
    export_pruned(model, adapter, first, tmp_path / "one", progress=False)
    once = load(tmp_path / "one")
    second = Selection.from_dict(selection_dict(once, r=4, seed=2, model_fingerprint="one"), origin="second")
    export_pruned(once, get_adapter(once.config), second, tmp_path / "two", progress=False)
    twice = load(tmp_path / "two")
    third = Selection.from_dict(selection_dict(twice, r=3, seed=5, model_fingerprint="two"), origin="third")
    export_pruned(twice, get_adapter(twice.config), third, tmp_path / "three", progress=False)
    final = load(tmp_path / "three")
    expected = {
        str(i): [first.kept[i][second.kept[i][e]] for e in third.kept[i]] for i in first.kept
    }
    assert final.config.kept_experts == expected
    # The thrice-pruned model equals the original pruned once to the composed kept sets.
    direct = tiny_model()
    composed = Selection.from_dict(
        selection_dict(direct, r=3, layers=[{"layer": int(i), "kept": v} for i, v in expected.items()]), origin="direct"
    )
    export_pruned(direct, adapter, composed, tmp_path / "direct", progress=False)
    assert torch.equal(logits(final, ids), logits(load(tmp_path / "direct"), ids))
    chain = final.config.pruning["chain"]
    assert [step["r"] for step in chain] == [6, 4] and final.config.pruning["r"] == 3
    assert chain[0]["kept_experts"] == {str(i): v for i, v in first.kept.items()}
    assert chain[1]["kept_experts"] == {str(i): [first.kept[i][e] for e in second.kept[i]] for i in first.kept}
    card = (tmp_path / "three" / "README.md").read_text()
    assert "## Chain of prunings" in card
    for number, (r, n, sel) in enumerate([(6, 8, first), (4, 6, second), (3, 4, third)], 1):
        assert f"| {number} | `enumerate` | {r} of {n} | `{sel.sha256}` |" in card
    for layer, kept in expected.items():
        assert f"| {layer} | {kept} | {sorted(set(range(8)) - set(kept))} |" in card
