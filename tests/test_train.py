"""The model stage: tiny embedded training, real-model manifests, one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import EmbeddedModelParams, TrainParams
from pipeline.config import CorpusEvalParams, CorpusParams
from pipeline.corpus import build_corpus, build_eval, corpus_manifest, write_corpus
from pipeline.errors import PipelineError
from pipeline.models.loading import checkpoint_fingerprint
from pipeline.train import (
    CONFIG_BUILDERS,
    MIN_LR_RATIO,
    RoutingRecorder,
    UnigramModel,
    adopt_source_model,
    batches,
    build_config,
    build_model,
    embedded_manifest,
    layer_balance_loss,
    lr_factor,
    pack,
    routing_balance,
    routing_divergence,
    train_embedded,
    train_model,
)
from stages.spec import spec
from tests.factory import dense_checkpoint, save_tiny_checkpoint
from tests.project import run_stage, set_params, stage_dir_project

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("prose", "code", "arith")
TINY_TRAIN = TrainParams(
    seq_len=32, batch_size=16, steps=80, lr=1e-2, warmup_steps=8, eval_tokens_per_domain=1024, seed=3
)
TINY = EmbeddedModelParams(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    num_experts=4,
    top_k=2,
    max_position_embeddings=64,
    train=TINY_TRAIN,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    ev_settings = CorpusEvalParams(mc_items_per_domain=4, ppl_docs_per_domain=2)
    settings = CorpusParams(
        domains=list(DOMAINS), seed=1, max_chars_per_domain=30_000, doc_chars=400, test_fraction=0.1, eval=ev_settings
    )
    corpus = build_corpus(settings)
    evals = build_eval(corpus, DOMAINS, ev_settings, 1)
    write_corpus(out, corpus, evals, corpus_manifest(corpus, evals, settings))
    return out / "data"


@pytest.fixture(scope="module")
def trained(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    steps: list[tuple[int, dict]] = []
    result = train_embedded(corpus_dir, out, TINY, torch.device("cpu"), on_step=lambda s, m: steps.append((s, m)))
    return out, result, steps


def test_tiny_training_beats_unigram_and_loads_with_auto_classes(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result, steps = trained
    assert [s for s, _ in steps] == list(range(TINY_TRAIN.steps))
    assert steps[-1][1]["train_loss"] < steps[0][1]["train_loss"] - 1.0
    for domain in DOMAINS:
        ppl, base = result.metrics[f"val_ppl.{domain}"], result.metrics[f"unigram_ppl.{domain}"]
        assert ppl < 0.6 * base, f"{domain}: model {ppl:.1f} vs unigram {base:.1f}"
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint").eval()
    tok = AutoTokenizer.from_pretrained(out / "checkpoint")
    assert model.config.model_type == "mixtral" and model.config.num_local_experts == TINY.num_experts
    assert len(tok) <= TINY.vocab_size and tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
    text = "12 + 30 = 42\ndef f(x):\n    return x"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == text
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert math.isfinite(float(loss))
    assert sorted(p.name for p in (out / "checkpoint").glob("*.safetensors")) == ["model.safetensors"]


def test_routing_histograms_and_plots(trained):
    out, result, _ = trained
    plots = out / "plots"
    for name in (
        "routing.json",
        "routing.png",
        "perplexity.json",
        "perplexity.png",
        "train_loss.json",
        "train_loss.png",
    ):
        assert (plots / name).is_file(), name
    rows = json.loads((plots / "routing.json").read_text())
    per_domain_layer: dict[tuple[str, int], int] = {}
    for row in rows:
        key = (row["domain"], row["layer"])
        per_domain_layer[key] = per_domain_layer.get(key, 0) + row["count"]
    for domain in DOMAINS:
        tokens = result.evaluation[domain]["tokens"]
        blocks = tokens / (TINY_TRAIN.seq_len - 1)
        for layer in range(TINY.num_layers):
            # every token of every block is routed to top_k experts in every MoE layer
            assert per_domain_layer[(domain, layer)] == blocks * TINY_TRAIN.seq_len * TINY.top_k
    loss_rows = json.loads((plots / "train_loss.json").read_text())
    assert len(loss_rows) == TINY_TRAIN.steps
    assert 0.0 <= result.metrics["routing_jsd"] <= math.log2(len(DOMAINS))
    n = TINY.num_experts
    for layer in range(TINY.num_layers):
        lo, hi = result.metrics[f"routing_min_share.layer{layer}"], result.metrics[f"routing_max_share.layer{layer}"]
        assert 0.0 <= lo <= 1.0 <= hi <= n
        assert 0.0 < result.metrics[f"routing_entropy.layer{layer}"] <= math.log2(n) + 1e-9
    assert result.metrics["routing_min_share"] == min(result.metrics[f"routing_min_share.layer{i}"] for i in range(TINY.num_layers))


def test_routing_balance_of_known_counts():
    # layer 0: uniform over 4 experts (both domains); layer 1: expert 3 never used, expert 0 has half
    routing = {
        "prose": {0: [5.0, 5.0, 5.0, 5.0], 1: [10.0, 6.0, 4.0, 0.0]},
        "code": {0: [5.0, 5.0, 5.0, 5.0], 1: [10.0, 2.0, 8.0, 0.0]},
    }
    bal = routing_balance(routing)
    assert bal[0] == {"min_share": 1.0, "max_share": 1.0, "entropy": 2.0, "max_entropy": 2.0}
    assert bal[1]["min_share"] == 0.0 and bal[1]["max_share"] == 2.0
    shares = (0.5, 0.2, 0.3)  # expert 3's zero share adds nothing
    assert bal[1]["entropy"] == pytest.approx(-sum(q * math.log2(q) for q in shares))


def test_embedded_manifest(trained):
    out, result, _ = trained
    manifest = embedded_manifest(result.checkpoint, "outputs/model/checkpoint")
    assert manifest.path == "outputs/model/checkpoint"
    assert manifest.fingerprint == checkpoint_fingerprint(out / "checkpoint")
    assert manifest.model_type == "mixtral" and manifest.num_experts == 4 and manifest.top_k == 2
    assert manifest.moe_layers == [0, 1] and manifest.hidden_size == 32


def test_training_is_deterministic(corpus_dir):
    blocks = torch.randint(0, 300, (24, 16), generator=torch.Generator().manual_seed(0))
    settings = TrainParams(seq_len=16, batch_size=4, steps=4, warmup_steps=1, seed=5)
    states = []
    for _ in range(2):
        model = build_model(build_config(TINY, 0, 0.01), seed=11)
        stats = train_model(model, blocks, settings, torch.device("cpu"))
        states.append((model.state_dict(), [r["loss"] for r in stats.losses]))
    (a, la), (b, lb) = states
    assert la == lb
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = build_model(build_config(TINY, 0, 0.01), seed=12)
    assert not torch.equal(other.state_dict()["lm_head.weight"], a["lm_head.weight"])


@pytest.mark.parametrize("architecture", sorted(CONFIG_BUILDERS))
def test_every_architecture_trains_a_step_and_routes_top_k(architecture):
    shape = TINY.model_copy(update={"architecture": architecture})
    config = build_config(shape, 0, 0.02)
    model = build_model(config, seed=0)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = float(model(input_ids=ids, labels=ids).loss)
    stats = train_model(model, ids, TrainParams(seq_len=16, batch_size=2, steps=1, warmup_steps=0), torch.device("cpu"))
    assert stats.losses[0]["aux_loss"] > 0, "router load-balancing loss missing"
    assert stats.losses[0]["loss"] == pytest.approx(plain, rel=1e-5), "logged loss must be the LM loss alone"
    recorder = RoutingRecorder(model)
    with torch.no_grad():
        model(input_ids=ids)
    counts = recorder.take()
    recorder.remove()
    assert counts, f"{architecture}: no router found"
    for layer, c in counts.items():
        assert len(c) == shape.num_experts and sum(c) == ids.numel() * shape.top_k, (layer, c)


def test_lr_schedule_warms_up_then_decays():
    total, warm = 100, 10
    f = [lr_factor(s, warm, total) for s in range(total)]
    assert all(a < b for a, b in zip(f[: warm - 1], f[1:warm], strict=True))
    assert f[warm - 1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1 :], strict=False))
    assert lr_factor(total, warm, total) == pytest.approx(MIN_LR_RATIO)


def test_pack_and_batches():
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    blocks = pack(seqs, 4)
    assert blocks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert pack(seqs, 4, max_tokens=3).shape == (1, 4)
    assert pack([[1, 2, 3]], 8).tolist() == [[1, 2, 3]]
    many = torch.arange(10).unsqueeze(1)
    seen = torch.cat(list(batches(many, 4, 5, seed=0))).flatten().tolist()
    assert len(seen) == 20 and sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen == torch.cat(list(batches(many, 4, 5, seed=0))).flatten().tolist()


def test_unigram_is_add_one_smoothed():
    tokens = torch.tensor([0, 0, 1, 3])
    uni = UnigramModel(tokens, vocab_size=5)
    assert float(uni.log_probs.exp().sum()) == pytest.approx(1.0)
    assert uni.nll(torch.tensor([0])) == pytest.approx(-math.log(3 / 9))
    assert uni.nll(torch.tensor([4])) == pytest.approx(-math.log(1 / 9))


def test_routing_divergence_bounds():
    same = {"a": {0: [5.0, 5.0, 0.0]}, "b": {0: [1.0, 1.0, 0.0]}}
    apart = {"a": {0: [4.0, 0.0]}, "b": {0: [0.0, 7.0]}}
    assert routing_divergence(same)[0] == pytest.approx(0.0, abs=1e-12)
    assert routing_divergence(apart)[0] == pytest.approx(1.0)


# -- a model that is not trained here ----------------------------------------------------------------
def test_local_checkpoint_gives_a_manifest(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "tiny-moe")
    manifest = adopt_source_model(str(path), "main", tmp_path / "out" / "checkpoint")
    assert manifest.path == str(path.resolve()) and manifest.revision is None
    assert manifest.source == str(path)
    assert manifest.fingerprint == checkpoint_fingerprint(path)
    assert manifest.num_experts == 8 and manifest.top_k == 2 and manifest.moe_layers == [0, 1]
    readme = (tmp_path / "out" / "checkpoint" / "README.md").read_text()
    assert str(path.resolve()) in readme and manifest.fingerprint in readme


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: str(tmp / "missing-model"), "model.source: model path .* does not exist"),
        (lambda tmp: str((tmp / "empty").mkdir() or tmp / "empty"), "has no config.json"),
        (lambda tmp: "no-such-org-zz9/no-such-moe", "neither a local directory nor in the Hugging Face cache"),
        (lambda tmp: str(dense_checkpoint(tmp / "dense")), "not a supported Mixture-of-Experts"),
    ],
    ids=["missing-path", "not-a-checkpoint", "hub-id-not-cached", "dense-model"],
)
def test_source_errors_are_one_line(tmp_path, make, message):
    source = make(tmp_path)
    with pytest.raises(PipelineError, match=message) as err:
        adopt_source_model(source, "main", tmp_path / "out" / "checkpoint")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "checkpoint" / "README.md").exists()


def test_missing_corpus_and_bad_seq_len(tmp_path, corpus_dir):
    with pytest.raises(PipelineError, match="run the corpus stage first"):
        train_embedded(tmp_path / "nope", tmp_path / "out", TINY, torch.device("cpu"))
    bad = TINY.model_copy(update={"train": TINY_TRAIN.model_copy(update={"seq_len": 128})})
    with pytest.raises(PipelineError, match="model.embedded.train.seq_len"):
        train_embedded(corpus_dir, tmp_path / "out", bad, torch.device("cpu"))


# -- the DVC stage, end to end (real MLflow store, no mocks) -----------------------------------------
def _tiny_params(**model: object) -> dict:
    """A tiny corpus and model (merged into params.yaml by tests/project.stage_dir_project)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["corpus"].update(max_chars_per_domain=20_000, doc_chars=400, test_fraction=0.15)
    params["corpus"]["eval"].update(mc_items_per_domain=4, ppl_docs_per_domain=2)
    emb = TINY.model_dump()
    emb["train"].update(steps=12)
    params["model"].update(embedded=emb, **model)
    for cs in params["calibration"]["sets"].values():
        cs["seq_len"] = 32
    params["search"]["r"] = 3
    params["runtime"]["device"] = "cpu"
    params["runtime"]["threads"] = 1
    return params


@pytest.mark.slow
def test_model_stage_end_to_end(tmp_path):
    project = stage_dir_project(tmp_path, _tiny_params())
    for stage in ("corpus", "model"):
        proc = run_stage(project, stage)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for path in spec("model", project).outs:
        assert (tmp_path / path).exists(), f"dvc.yaml declares {path} but the stage did not write it"
    manifest = json.loads((tmp_path / "outputs/model/manifest.json").read_text())
    assert manifest["path"] == "outputs/model/checkpoint"
    assert manifest["fingerprint"] == checkpoint_fingerprint(tmp_path / manifest["path"])
    run = json.loads((tmp_path / "outputs/model/run.json").read_text())
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    history = client.get_metric_history(run["run_id"], "train_loss")
    assert sorted(m.step for m in history) == list(range(12))
    data = client.get_run(run["run_id"]).data
    assert data.metrics["val_ppl"] < data.metrics["unigram_ppl"]
    assert (
        data.tags["upstream.corpus.run_id"] == json.loads((tmp_path / "outputs/corpus/run.json").read_text())["run_id"]
    )
    artifacts = {a.path for a in client.list_artifacts(run["run_id"], "plots")}
    assert "plots/routing.png" in artifacts


@pytest.mark.slow
def test_model_stage_with_a_local_checkpoint(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny-moe")
    params = _tiny_params(source=str(ckpt))
    params["tracking"]["enabled"] = False
    project = stage_dir_project(tmp_path, params)
    for stage in ("corpus", "model"):
        proc = run_stage(project, stage)
        assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "outputs/model/manifest.json").read_text())
    assert manifest["path"] == str(ckpt.resolve()) and manifest["fingerprint"] == checkpoint_fingerprint(ckpt)
    assert (tmp_path / "outputs/model/checkpoint/README.md").is_file()
    assert json.loads((tmp_path / "outputs/model/metrics.json").read_text())["num_experts"] == 8
    params["model"]["source"] = str(tmp_path / "gone")
    set_params(project, params)
    proc = run_stage(project, "model")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model: model.source: model path")
    assert json.loads((tmp_path / "outputs/model/manifest.json").read_text())["path"] == str(ckpt.resolve())


def test_balance_loss_is_per_layer():
    # k = 1 of n = 2: layer A sends every token to expert 0, layer B every token to expert 1
    a = torch.tensor([[20.0, 0.0]]).repeat(64, 1)
    b = torch.tensor([[0.0, 20.0]]).repeat(64, 1)
    balanced = torch.zeros(64, 2)
    balanced[::2, 0] = balanced[1::2, 1] = 20.0
    assert float(layer_balance_loss([balanced, balanced], 1)) == pytest.approx(1.0, abs=1e-6)
    # each layer alone is collapsed: 2.0; pooled over layers (transformers' own loss) it looks balanced
    assert float(layer_balance_loss([a, None, b], 1)) == pytest.approx(2.0, abs=1e-6)
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    assert float(load_balancing_loss_func((a, b), 2, 1)) == pytest.approx(1.0, abs=1e-6)
    logits = torch.randn(32, 2, requires_grad=True)
    layer_balance_loss([logits], 1).backward()
    assert logits.grad is not None and bool(logits.grad.abs().sum() > 0)
    assert layer_balance_loss([None], 1) is None
