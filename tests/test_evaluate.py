"""Benchmark library: our lm-eval tasks run offline through real lm-eval, speed/memory, metrics, report."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import DEFAULT_VARIANTS, BenchmarkParams, SpeedParams
from pipeline.errors import PipelineError
from pipeline.evaluate import stats
from pipeline.evaluate.lmeval import (
    ItemScores,
    average_accuracy,
    evaluate_model,
    prepare_tasks,
    primary_metric,
    task_metrics,
)
from pipeline.evaluate.memory import PeakMemory, weight_bytes
from pipeline.evaluate.report import (
    VariantResult,
    build_metrics,
    check_metrics,
    flat_metrics,
    render_report,
    speedup_cell,
    verdict_tags,
    write_plots,
)
from pipeline.evaluate.runner import build_variants
from pipeline.evaluate.speed import (
    ExpertCounter,
    SpeedCase,
    encode_prompts,
    measure_speed,
)
from pipeline.evaluate.tasks import (
    embedded_tasks,
    expand_presets,
    mc_task_name,
    ppl_task_name,
    select_tasks,
)
from pipeline.task_files import write_task_files
from pipeline.io import dumps_json
from pipeline.models import get_adapter
from tests.factory import save_tiny_checkpoint, tiny_model, tiny_tokenizer
from tests.project import env as project_env
from tests.project import run_stage, stage_dir_project, write_run_records

WORDS = "the quick brown fox jumps over lazy dog def return value list range print sum 12 35 47 + = x y".split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_eval_data(directory: Path, domains=("prose", "code"), mc_items=6, ppl_docs=2, seed=0) -> Path:
    """Tiny eval files in the corpus stage's documented format."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for domain in domains:
        with open(directory / f"{domain}_mc.jsonl", "w", encoding="utf-8") as fh:
            for i in range(mc_items):
                choices = [_text(rng, rng.randint(2, 5)) for _ in range(3)]
                rec = {"id": f"{domain}-mc-{i}", "context": _text(rng, 8) + " ", "choices": choices, "label": i % 3}
                fh.write(json.dumps(rec) + "\n")
        with open(directory / f"{domain}_ppl.jsonl", "w", encoding="utf-8") as fh:
            for i in range(ppl_docs):
                fh.write(json.dumps({"id": f"{domain}-ppl-{i}", "text": _text(rng, 30)}) + "\n")
    write_task_files(directory, domains, directory.resolve())  # absolute: tests run from the repository root
    return directory


@pytest.fixture(scope="module")
def lm_results(tmp_path_factory):
    """Our embedded tasks evaluated once by real lm-eval on a tiny random model."""
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1" and os.environ.get("HF_HUB_OFFLINE") == "1"
    eval_dir = write_eval_data(tmp_path_factory.mktemp("eval"))
    model, tok = tiny_model(seed=1), tiny_tokenizer()
    with select_tasks(["embedded"], eval_dir) as sel:
        evaluation = evaluate_model(model, tok, sel, batch_size=8)
    return {
        "raw": evaluation.raw,
        "rows": evaluation.rows,
        "items": evaluation.items,
        "model": model,
        "tok": tok,
        "eval_dir": eval_dir,
    }


def _direct_mc_accuracy(model, tok, path: Path) -> float:
    """Accuracy from the model's own log-probabilities, scored the way lm-eval documents it."""
    hits = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        context = rec["context"].rstrip()
        moved = rec["context"][len(context) :]
        scores = []
        for choice in rec["choices"]:
            whole = tok(context + moved + choice, add_special_tokens=False)["input_ids"]
            n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0]
            target = ids[0, 1:]
            scores.append(float(logp[torch.arange(n_ctx - 1, len(whole) - 1), target[n_ctx - 1 :]].sum()))
        hits.append(max(range(len(scores)), key=scores.__getitem__) == rec["label"])
    return sum(hits) / len(hits)


def test_embedded_tasks_run_offline_through_lm_eval(lm_results):
    raw, rows = lm_results["raw"], lm_results["rows"]
    assert rows == [mc_task_name("code"), ppl_task_name("code"), mc_task_name("prose"), ppl_task_name("prose")]
    metrics = task_metrics(raw, rows)
    for domain in ("code", "prose"):
        mc = metrics[mc_task_name(domain)]
        assert 0.0 <= mc["acc"] <= 1.0 and 0.0 <= mc["acc_norm"] <= 1.0
        expected = _direct_mc_accuracy(
            lm_results["model"], lm_results["tok"], lm_results["eval_dir"] / f"{domain}_mc.jsonl"
        )
        assert mc["acc"] == pytest.approx(expected)
        ppl = metrics[ppl_task_name(domain)]
        assert ppl["word_perplexity"] > 1.0
        assert ppl["byte_perplexity"] == pytest.approx(2.0 ** ppl["bits_per_byte"], rel=1e-6)
    # lm-eval ran our task files as written: the data path as the writer was given it
    cfg = raw["configs"][mc_task_name("code")]
    assert cfg["dataset_path"] == "json"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str((lm_results["eval_dir"] / "code_mc.jsonl").resolve())
    assert raw["n-shot"][mc_task_name("code")] == 0


def test_per_document_scores_reproduce_lm_eval_metrics(lm_results):
    """log_samples: per-document correctness and rolling log-likelihoods with word/byte counts, in doc order."""
    raw, items = lm_results["raw"], lm_results["items"]
    assert "samples" not in raw  # the bulky per-sample log is not kept
    metrics = task_metrics(raw, lm_results["rows"])
    assert set(items) == set(lm_results["rows"])
    for domain in ("code", "prose"):
        mc = items[mc_task_name(domain)]
        assert mc.doc_ids == [str(i) for i in range(6)]
        for metric in ("acc", "acc_norm"):
            assert set(mc.scores[metric]) <= {0.0, 1.0}
            assert np.mean(mc.scores[metric]) == pytest.approx(metrics[mc_task_name(domain)][metric])
        ppl = items[ppl_task_name(domain)]
        texts = [json.loads(line)["text"] for line in (lm_results["eval_dir"] / f"{domain}_ppl.jsonl").open()]
        assert ppl.words == [len(t.split()) for t in texts] and ppl.bytes == [len(t.encode()) for t in texts]
        assert all(ll < 0 for ll in ppl.loglikelihood)
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            value = stats.corpus_metric(metric, np.array(ppl.loglikelihood), np.array(ppl.counts(metric)))
            assert value == pytest.approx(metrics[ppl_task_name(domain)][metric])
        assert ItemScores.from_json(json.loads(dumps_json(ppl.to_json()))) == ppl


def test_average_accuracy_uses_accuracy_tasks_only(lm_results):
    metrics = task_metrics(lm_results["raw"], lm_results["rows"])
    mcs = [metrics[mc_task_name(d)]["acc"] for d in ("code", "prose")]
    assert average_accuracy(metrics) == pytest.approx(sum(mcs) / 2)
    assert primary_metric(ppl_task_name("code"), metrics[ppl_task_name("code")]) is None
    assert primary_metric("hellaswag", {"acc": 0.3, "acc_norm": 0.4}) == "acc_norm"
    assert (
        primary_metric("gsm8k", {"exact_match_strict-match": 0.5, "exact_match_flexible-extract": 0.6})
        == "exact_match_strict-match"
    )


def test_num_fewshot_per_task_and_unknown_key(tmp_path):
    eval_dir = write_eval_data(tmp_path / "eval", domains=("arith", "prose"))
    with select_tasks(["embedded"], eval_dir) as sel:
        prepared = prepare_tasks(sel, {mc_task_name("arith"): 2, "embedded": 1})
        shots = {t.task_name: t.get_config("num_fewshot") for t in prepared.objects}
        assert shots[mc_task_name("arith")] == 2 and shots[mc_task_name("prose")] == 1
        with pytest.raises(PipelineError, match=r"benchmark.num_fewshot: 'gsm8k' not among"):
            prepare_tasks(sel, {"gsm8k": 5})


def test_paper_preset_is_one_switch():
    names, shots = expand_presets(["paper", "embedded"], {"mmlu": 5})
    assert names == [
        "boolq",
        "rte",
        "arc_challenge",
        "arc_easy",
        "hellaswag",
        "winogrande",
        "openbookqa",
        "mmlu",
        "gsm8k",
        "embedded",
    ]
    assert shots == {"gsm8k": 5, "mmlu": 5}
    assert expand_presets(["paper"], {"gsm8k": 8})[1] == {"gsm8k": 8}  # the user's count wins


def test_missing_data_is_one_clear_error(tmp_path):
    eval_dir = write_eval_data(tmp_path / "eval")
    (eval_dir / "code_ppl.jsonl").unlink()
    with pytest.raises(PipelineError) as err:
        with select_tasks(["embedded"], eval_dir):
            pass
    msg = str(err.value)
    assert "code_ppl.jsonl" in msg and "\n" not in msg and "corpus" in msg
    with pytest.raises(PipelineError, match="no embedded benchmark data"):
        embedded_tasks(tmp_path / "empty")


def test_task_files_are_the_include_path_and_name_their_data_as_given(tmp_path, monkeypatch):
    """The corpus stage's YAMLs run in place; a relative data path resolves from the current directory."""
    eval_dir = write_eval_data(tmp_path / "outputs" / "corpus" / "eval", domains=("prose",))
    first = {p.name: p.read_bytes() for p in eval_dir.glob("*.yaml")}
    write_task_files(eval_dir, ["prose"], Path("outputs/corpus/eval"))
    assert sorted(first) == ["embedded_prose_mc.yaml", "embedded_prose_ppl.yaml"]
    assert b"outputs/corpus/eval/prose_mc.jsonl" in (eval_dir / "embedded_prose_mc.yaml").read_bytes()
    again = {p.name: p.read_bytes() for p in write_task_files(tmp_path / "again", ["prose"], Path("outputs/corpus/eval"))}
    assert again == {p.name: p.read_bytes() for p in eval_dir.glob("*.yaml")}  # same arguments, same bytes
    assert again != first
    monkeypatch.chdir(tmp_path)  # the repository root of this layout
    tasks = embedded_tasks(Path("outputs/corpus/eval"))
    assert [(t.name, t.data_file.as_posix()) for t in tasks] == [
        (mc_task_name("prose"), "outputs/corpus/eval/prose_mc.jsonl"),
        (ppl_task_name("prose"), "outputs/corpus/eval/prose_ppl.jsonl"),
    ]
    monkeypatch.chdir(eval_dir)  # elsewhere, lm-eval would not find the data: one line saying so
    with pytest.raises(PipelineError, match=r"embedded_prose_mc.yaml: reads outputs/corpus/eval/prose_mc.jsonl, "
                       r"which from .* is not .*: run from the repository root\)$") as err:
        embedded_tasks(eval_dir)
    assert "\n" not in str(err.value)


def test_missing_task_file_is_one_clear_error(tmp_path):
    eval_dir = write_eval_data(tmp_path / "eval")
    (eval_dir / "embedded_code_ppl.yaml").unlink()
    with pytest.raises(PipelineError, match=r"embedded_code_ppl.yaml: lm-eval task file is missing \(run the corpus "
                       r"stage: dvc repro corpus\)$"):
        with select_tasks(["embedded"], eval_dir):
            pass


def test_malformed_data_names_file_and_line(tmp_path):
    eval_dir = write_eval_data(tmp_path / "eval")
    with open(eval_dir / "prose_mc.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "x", "context": "a", "choices": ["b"], "label": 3}) + "\n")
    with pytest.raises(PipelineError, match=r"prose_mc.jsonl:7: label 3 is not an index"):
        embedded_tasks(eval_dir)


def test_unknown_task_is_one_clear_error(tmp_path):
    eval_dir = write_eval_data(tmp_path / "eval")
    with pytest.raises(PipelineError) as err:
        with select_tasks(["embedded", "boolqq"], eval_dir):
            pass
    msg = str(err.value)
    assert msg.startswith("benchmark.tasks: unknown lm-eval task 'boolqq'")
    assert "did you mean boolq" in msg and "lm-eval ls tasks" in msg and "\n" not in msg


def test_expert_counter_counts_routed_and_skipped_slots():
    model = tiny_model(seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with ExpertCounter(model) as counter, torch.no_grad():
        model(ids)
    assert counter.token_layers == 2 * 7 * model.config.num_hidden_layers
    assert counter.evals_per_token == pytest.approx(model.config.num_experts_per_tok)
    # a routing transform that marks every second slot as not computed halves the evaluations
    adapter = get_adapter(model.config)
    n = model.config.num_local_experts

    def drop_second(w, idx):
        idx = idx.clone()
        idx[:, 1] = n
        return w, idx

    handles = [
        adapter.add_router_transform(adapter.moe_block(layer), drop_second) for layer in adapter.decoder_layers(model)
    ]
    try:
        with ExpertCounter(model) as counter, torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    assert counter.evals_per_token == pytest.approx(1.0)


def test_speed_interleaved_reports_every_variant():
    tok = tiny_tokenizer()
    big, small = tiny_model(seed=0), tiny_model(seed=0, num_experts=4)
    prompts = encode_prompts(tok, ["def f(x):", "The quick brown fox"], count=3, max_tokens=16)
    assert len(prompts) == 3 and all(p.shape[0] == 1 for p in prompts)
    res = measure_speed(
        [SpeedCase("original", big), SpeedCase("pruned", small)], prompts, new_tokens=5, repeats=2, warmup=0
    )
    for r in res.values():
        assert len(r.runs) == 2 and r.tokens_per_s > 0
        assert r.new_tokens_per_run == 3 * 5  # exactly new_tokens per prompt, no early stop
        assert r.expert_evals_per_token == pytest.approx(2.0)


def test_weight_bytes_and_peak_memory():
    big, small = tiny_model(seed=0), tiny_model(seed=0, num_experts=4)
    assert weight_bytes(big) == sum(p.numel() * 4 for p in big.parameters())
    expert = big.model.layers[0].mlp.experts
    per_expert = (expert.gate_up_proj[0].numel() + expert.down_proj[0].numel() + big.config.hidden_size) * 4
    assert weight_bytes(big) - weight_bytes(small) == per_expert * 4 * big.config.num_hidden_layers
    with PeakMemory() as mem:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB
        del block
    assert mem.peak_rss_bytes >= 64 * 1024 * 1024 and mem.peak_cuda_bytes is None


def _variant(name: str, correct: list[int], ll_scale: float, runs: list[float], **kw) -> VariantResult:
    """A variant whose lm-eval metrics are exactly the means / corpus metrics of its per-document scores."""
    acc = [float(i in correct) for i in range(20)]
    acc_norm = [float(i < 5) for i in range(20)]
    ll = [-ll_scale * (30 + 3 * d) for d in range(10)]
    words, nbytes = [10 + d for d in range(10)], [50 + 4 * d for d in range(10)]
    items = {
        "embedded_code_mc": ItemScores([str(i) for i in range(20)], {"acc": acc, "acc_norm": acc_norm}),
        "embedded_code_ppl": ItemScores([str(d) for d in range(10)], loglikelihood=ll, words=words, bytes=nbytes),
    }
    tasks = {
        "embedded_code_mc": {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))},
        "embedded_code_ppl": {
            "word_perplexity": float(stats.corpus_metric("word_perplexity", np.array(ll), np.array(words))),
            "bits_per_byte": float(stats.corpus_metric("bits_per_byte", np.array(ll), np.array(nbytes))),
        },
    }
    finite = [r for r in runs if math.isfinite(r)]
    median = float(np.median(finite)) if finite else float("nan")
    return VariantResult(name, tasks, items=items, tokens_per_s=median, tokens_per_s_runs=runs, **kw)


ORIGINAL_RUNS = [100.0, 98.0, 103.0, 101.0, 99.0, 100.0]


def _results() -> list[VariantResult]:
    """original: 10/20 right; original_skip: the same items, speed within noise; pruned: two items lost,
    every document's log-likelihood 20% lower, ~1.25x faster in every round; pruned_skip: no speed."""
    return [
        _variant("original", list(range(10)), 1.0, ORIGINAL_RUNS, weight_bytes=8_000_000, experts_per_layer=8,
                 peak_rss_bytes=10**9, expert_evals_per_token=2.0),
        _variant("original_skip", list(range(10)), 1.0, [103.0, 96.0, 101.0, 104.0, 97.0, 99.0], weight_bytes=8_000_000,
                 experts_per_layer=8, expert_evals_per_token=1.5, skipped_fraction=0.25),
        _variant("pruned", list(range(8)), 1.2, [126.0, 121.0, 130.0, 125.5, 124.0, 125.0], weight_bytes=6_000_000,
                 experts_per_layer=6, peak_rss_bytes=9 * 10**8, expert_evals_per_token=2.0),
        _variant("pruned_skip", list(range(8)), 1.2, [float("nan")] * 6, weight_bytes=6_000_000, experts_per_layer=6,
                 expert_evals_per_token=1.5, skipped_fraction=0.25),
    ]


def test_metrics_schema():
    metrics = build_metrics(_results())
    check_metrics(metrics)
    v = metrics["variants"]
    assert set(v) == {"original", "original_skip", "pruned", "pruned_skip"}
    assert metrics["baseline"] == "original" and metrics["statistics"]["confidence"] == 0.95
    # speed: median and spread over rounds; speed-up = median of per-round ratios, with interval and verdict
    o = v["original"]
    assert o["speedup"] == 1.0 and o["speedup_verdict"] is None and o["vs_original"] is None
    assert o["tokens_per_s_spread"] == {"median": 100.0, "min": 98.0, "max": 103.0, "q1": 99.25, "q3": 100.75, "rounds": 6}
    ratios = [p / b for p, b in zip([126.0, 121.0, 130.0, 125.5, 124.0, 125.0], ORIGINAL_RUNS, strict=True)]
    assert v["pruned"]["speedup"] == pytest.approx(float(np.median(ratios)))
    assert v["pruned"]["speedup_verdict"] == "faster" and v["pruned"]["speedup_interval"]["low"] > 1.0
    low, high = v["original_skip"]["speedup_interval"].values()
    assert v["original_skip"]["speedup_verdict"] == "within noise" and low <= 1.0 <= high
    assert v["pruned_skip"]["tokens_per_s"] is None and v["pruned_skip"]["speedup"] is None  # non-finite -> null
    assert v["pruned_skip"]["tokens_per_s_spread"] is None
    # a skip variant against its own no-skip variant, round by round
    skip = v["original_skip"]["skip_speedup"]
    assert skip["over"] == "original" and skip["ratio"] == v["original_skip"]["speedup"]
    assert skip["verdict"] == "within noise" and skip["interval"] == v["original_skip"]["speedup_interval"]
    assert v["pruned_skip"]["skip_speedup"] is None and v["pruned"]["skip_speedup"] is None
    assert flat_metrics(v["original_skip"])["skip_speedup_ci_low"] == skip["interval"]["low"]
    assert verdict_tags(v["original_skip"])["verdict/skip_speedup"] == "within noise"
    # accuracy and perplexity with their intervals
    assert o["average_accuracy"] == 0.5
    low, high = stats.accuracy_interval([1.0] * 10 + [0.0] * 10)
    assert o["intervals"]["embedded_code_mc"]["acc"] == {"low": low, "high": high}
    for name, e in v.items():
        for task, ms in e["intervals"].items():
            for metric, ci in ms.items():
                assert ci["low"] <= e["tasks"][task][metric] <= ci["high"], (name, task, metric)
        assert e["average_accuracy_interval"]["low"] <= e["average_accuracy"] <= e["average_accuracy_interval"]["high"]
    # paired differences from the original
    vs = v["pruned"]["vs_original"]
    acc = vs["tasks"]["embedded_code_mc"]["acc"]
    assert acc["difference"] == pytest.approx(-0.1) and acc["n"] == 20
    assert acc["p_value"] == pytest.approx(0.5) and acc["verdict"] == "within noise"  # 0 gained, 2 lost
    assert vs["tasks"]["embedded_code_ppl"]["word_perplexity"]["verdict"] == "worse"
    assert vs["tasks"]["embedded_code_ppl"]["word_perplexity"]["difference"] > 0
    assert vs["average_accuracy"]["difference"] == pytest.approx(-0.1)
    same = v["original_skip"]["vs_original"]["tasks"]
    assert same["embedded_code_mc"]["acc"]["difference"] == 0.0
    assert {c["verdict"] for ms in same.values() for c in ms.values()} == {"within noise"}
    # MLflow: intervals and differences as metrics, verdicts as tags
    flat = flat_metrics(v["pruned"])
    assert flat["embedded_code_mc/acc_ci_low"] < 0.4 < flat["embedded_code_mc/acc_ci_high"]
    assert flat["vs_original/embedded_code_mc/acc/p_value"] == pytest.approx(0.5)
    assert flat["speedup_ci_low"] > 1.0 and "tokens_per_s_q1" in flat
    assert all(isinstance(x, int | float) for x in flat.values())
    tags = verdict_tags(v["pruned"])
    assert tags["verdict/speedup"] == "faster" and tags["verdict/embedded_code_ppl/word_perplexity"] == "worse"
    json.loads(dumps_json(metrics))  # strict JSON, no NaN
    assert build_metrics(_results()) == metrics  # seeded bootstrap: the same document every time
    bad = json.loads(dumps_json(metrics))
    del bad["variants"]["pruned"]["weight_bytes"]
    with pytest.raises(PipelineError, match="'pruned' lacks weight_bytes"):
        check_metrics(bad)
    bad = json.loads(dumps_json(metrics))
    bad["variants"]["pruned"]["intervals"]["embedded_code_mc"]["acc"] = {"low": 0.6, "high": 0.2}
    with pytest.raises(PipelineError, match="pruned/embedded_code_mc/acc: an interval must be"):
        check_metrics(bad)
    bad = json.loads(dumps_json(metrics))
    bad["variants"]["pruned"]["vs_original"]["tasks"]["embedded_code_mc"]["acc"]["verdict"] = "great"
    with pytest.raises(PipelineError, match="vs_original/embedded_code_mc/acc: verdict 'great'"):
        check_metrics(bad)
    with pytest.raises(PipelineError, match="non-empty"):
        check_metrics({"variants": {}})


def test_report_has_paper_layout_intervals_verdicts_and_plots(tmp_path):
    metrics = build_metrics(_results())
    v = metrics["variants"]
    text = render_report(metrics, {"speed": "greedy"})
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| Model | Experts"))
    assert header == "| Model | Experts | embedded_code_mc | Average | Memory (MB) | Speed-up |"

    def ci(interval, scale=100.0, spec=".1f"):
        return f"[{interval['low'] * scale:{spec}}, {interval['high'] * scale:{spec}}]"

    acc_ci = ci(v["original"]["intervals"]["embedded_code_mc"]["acc"])
    avg_ci = ci(v["original"]["average_accuracy_interval"])
    assert f"| original | 8 | 50.0 {acc_ci} | 50.0 {avg_ci} | 8.0 | 1.00x (reference) |" in lines
    pruned = next(line for line in lines if line.startswith("| pruned | 6 | 40.0 ["))
    assert pruned.endswith(f"| {v['pruned']['speedup']:.2f}x {ci(v['pruned']['speedup_interval'], 1.0, '.2f')} |")
    skip = next(line for line in lines if line.startswith("| original_skip | 8 |"))
    # a speed-up inside the noise never reads as a speed-up
    assert skip.endswith(
        f"| within noise ({v['original_skip']['speedup']:.2f}x {ci(v['original_skip']['speedup_interval'], 1.0, '.2f')}) |"
    )
    assert "| pruned_skip | 6 | 40.0 [" in text and "| pruned_skip | decoding |" not in text  # not timed: no speed-up
    # the differences table: accuracy in points with McNemar's p, perplexity, speed-up, verdicts
    assert "## Differences from `original`" in text
    acc_row = next(line for line in lines if line.startswith("| pruned | embedded_code_mc | acc |"))
    assert acc_row.startswith("| pruned | embedded_code_mc | acc | -10.0 pp | [") and acc_row.endswith("| 0.5 | within noise |")
    assert any(line.startswith("| pruned | embedded_code_ppl | word_perplexity | +") and line.endswith("| worse |")
               for line in lines)
    assert any(line.startswith("| pruned | decoding | speed-up |") and line.endswith("| faster |") for line in lines)
    assert any(line.startswith("| original_skip | decoding | speed-up |") and line.endswith("| within noise |")
               for line in lines)
    assert not any(line.startswith("| original | embedded_code_mc |") for line in lines)  # no row for the baseline
    assert any(line.startswith("| Model | embedded_code_ppl bits_per_byte") for line in lines)
    assert "## How the intervals are computed" in text and "Wilson" in text and "McNemar" in text
    assert "| original | 100.0 | 98.0-103.0 | 99.2-100.8 | 6 | 1.00x (reference) |" in text
    few = build_metrics([_variant("original", [], 1.0, [100.0, 101.0], weight_bytes=1),
                         _variant("pruned", [], 1.0, [150.0, 152.0], weight_bytes=1)])["variants"]["pruned"]
    assert few["speedup_verdict"] == "within noise"  # two rounds cannot show a speed-up
    assert speedup_cell(few) == f"within noise ({few['speedup']:.2f}x {ci(few['speedup_interval'], 1.0, '.2f')}, too few rounds)"
    big = build_metrics(
        [VariantResult("original", {"boolq": {"acc": 0.85}}, weight_bytes=89_900_000_000, tokens_per_s=10.0)]
    )
    assert "| original | - | 85.0 [-] | 85.0 [-] | 89.9 | 1.00x (reference) |" in render_report(big).splitlines()
    files = write_plots(metrics, tmp_path / "plots")
    names = {f.name for f in files}
    assert {
        "accuracy_vs_memory.png",
        "task_accuracy.png",
        "speedup.png",
        "accuracy_vs_memory.json",
        "task_accuracy.json",
        "speedup.json",
    } <= names
    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((tmp_path / "plots" / "task_accuracy.json").read_text())
    assert {(r["task"], r["variant"], r["accuracy"]) for r in rows} >= {("embedded_code_mc", "pruned", 0.4)}
    assert all(r["ci_low"] <= r["accuracy"] <= r["ci_high"] for r in rows)  # the error bars drawn
    speed = json.loads((tmp_path / "plots" / "speedup.json").read_text())
    assert [r["variant"] for r in speed] == ["original", "original_skip", "pruned"]
    assert [r["verdict"] for r in speed] == [None, "within noise", "faster"]


def test_skip_variants_evaluate_and_count_fewer_experts(tmp_path):
    """The four default variants and static top-1 through the runner."""
    from pipeline.evaluate.runner import (
        BenchmarkSetup,
        build_variants,
        run_benchmark,
    )

    original = save_tiny_checkpoint(tmp_path / "original", seed=0)
    pruned = save_tiny_checkpoint(tmp_path / "pruned", seed=0, num_experts=6)
    eval_dir = write_eval_data(tmp_path / "eval", mc_items=3, ppl_docs=1)
    layers = {str(i): 0.9 for i in range(2)}
    names = [*DEFAULT_VARIANTS, "pruned_top1"]
    variants = build_variants(names, original, pruned, {"original": layers, "pruned": layers})
    assert [(v.name, v.pruned, v.skip, v.top_k) for v in variants] == [
        ("original", False, False, None),
        ("original_skip", False, True, None),
        ("pruned", True, False, None),
        ("pruned_skip", True, True, None),
        ("pruned_top1", True, False, 1),
    ]
    speed = SpeedParams(prompts=2, new_tokens=4, repeats=1, warmup=0)
    params = BenchmarkParams(tasks=["embedded"], batch_size=4, speed=speed)
    settings = BenchmarkSetup(params, torch.device("cpu"), torch.float32, trust_remote_code=False)
    results = {r.name: r for r in run_benchmark(variants, settings, eval_dir, tmp_path / "results")}
    for name in ("original", "pruned"):
        assert results[name].expert_evals_per_token == pytest.approx(2.0)
        assert results[f"{name}_skip"].expert_evals_per_token < 2.0
        assert results[f"{name}_skip"].weight_bytes == results[name].weight_bytes
    assert results["pruned"].weight_bytes < results["original"].weight_bytes
    assert results["pruned_top1"].expert_evals_per_token == pytest.approx(1.0)  # static top-1: every token, one expert
    assert results["pruned_top1"].weight_bytes == results["pruned"].weight_bytes
    assert set(results["original_skip"].tasks) == set(results["original"].tasks)
    for name, r in results.items():  # per-document scores kept for the paired comparisons
        assert len(r.tokens_per_s_runs) == 1 and set(r.items) == set(r.tasks)
        saved = json.loads((tmp_path / "results" / f"{name}.items.json").read_text())
        assert {t: ItemScores.from_json(d) for t, d in saved["tasks"].items()} == r.items
        assert r.items["embedded_code_mc"].doc_ids == ["0", "1", "2"]


def test_build_variants_errors(tmp_path):
    with pytest.raises(PipelineError, match=r"thresholds.json: no 'pruned' thresholds for variant pruned_skip"):
        build_variants(["pruned_skip"], tmp_path, tmp_path, {"original": {"0": 0.5}})
    variants = build_variants(["original", "pruned"], tmp_path / "a", tmp_path / "b", None)
    assert [v.checkpoint.name for v in variants] == ["a", "b"] and not any(v.skip for v in variants)
    (tmp_path / "merged").mkdir()  # export.merge none: the folder holds only a README
    with pytest.raises(PipelineError, match=r"^benchmark.variants: merged needs the merged checkpoint \(set export.merge"):
        build_variants(["merged"], tmp_path, tmp_path, None, merged=tmp_path / "merged")
    (tmp_path / "merged" / "config.json").write_text("{}")
    with pytest.raises(PipelineError, match=r"thresholds.json: no 'merged' thresholds for variant merged_skip"):
        build_variants(["merged_skip"], tmp_path, tmp_path, {"pruned": {"0": 0.5}}, merged=tmp_path / "merged")
    (merged,) = build_variants(["merged"], tmp_path, tmp_path / "b", None, merged=tmp_path / "merged")
    assert merged.checkpoint.name == "merged" and merged.merged and merged.pruned and not merged.skip
    with pytest.raises(PipelineError, match=r"^benchmark.variants: recovered needs the recovered checkpoint \(run: dvc repro recover"):
        build_variants(["recovered"], tmp_path, tmp_path, None, recovered=tmp_path / "recover")
    (tmp_path / "recover").mkdir()
    (tmp_path / "recover" / "config.json").write_text("{}")
    with pytest.raises(PipelineError, match=r"thresholds.json: no 'recovered' thresholds for variant recovered_skip"):
        build_variants(["recovered_skip"], tmp_path, tmp_path, {"pruned": {"0": 0.5}}, recovered=tmp_path / "recover")
    rec, rec_skip = build_variants(["recovered", "recovered_skip"], tmp_path, tmp_path / "b", {"recovered": {"0": 0.25}},
                                   recovered=tmp_path / "recover")
    assert rec.checkpoint.name == "recover" and rec.recovered and rec.pruned and not rec.merged and not rec.skip
    assert rec_skip.thresholds == {"0": 0.25} and rec_skip.load_key == rec.load_key


def _fake_upstream(root: Path, override: dict) -> None:
    """A bare stage folder (dvc.yaml, params.yaml with ``override``) holding the upstream outputs in
    the documented formats, from tiny random checkpoints, and each upstream stage's run.json."""
    from pipeline.io import write_json
    from pipeline.models.loading import build_manifest

    stage_dir_project(root, override)
    out = root / "outputs"
    original = save_tiny_checkpoint(out / "model" / "checkpoint", seed=0)
    save_tiny_checkpoint(out / "export" / "model", seed=0, num_experts=6)
    manifest = build_manifest("embedded", original, None)
    manifest = type(manifest)(**{**vars(manifest), "path": "outputs/model/checkpoint"})
    manifest.save(out / "model" / "manifest.json")
    write_eval_data(out / "corpus" / "eval", domains=("code", "prose"), mc_items=4, ppl_docs=1)
    write_json(
        out / "search" / "selection.json",
        {"strategy": "enumerate", "mode": "layerwise", "r": 6, "calibration": "general", "layers": []},
    )
    write_json(
        out / "skip" / "thresholds.json",
        {"quantile": 0.5, "calibration": "general", "rule": "tail", "original": {"0": 0.5}, "pruned": {"0": 0.5}},
    )
    write_run_records(root, "corpus", "model", "search", "export", "recover", "skip_calibration")


@pytest.mark.slow
def test_stage_end_to_end_with_mlflow_and_dvc(tmp_path):
    """The benchmark stage on tiny checkpoints: metrics file, report, MLflow child runs, dvc metrics/plots."""
    _fake_upstream(tmp_path, {
        "benchmark": {"variants": ["original", "pruned"], "batch_size": 8,
                      "speed": {"prompts": 2, "new_tokens": 4, "repeats": 2, "warmup": 0}},
        "runtime": {"device": "cpu"},
    })
    proc = run_stage(tmp_path, "benchmark", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = tmp_path / "outputs" / "benchmark"
    metrics = json.loads((bench / "metrics.json").read_text())
    check_metrics(metrics)
    assert set(metrics["variants"]) == {"original", "pruned"}
    assert metrics["variants"]["original"]["speedup"] == 1.0
    assert metrics["variants"]["pruned"]["weight_bytes"] < metrics["variants"]["original"]["weight_bytes"]
    # intervals, spread over the 2 rounds, speed-up interval and verdict, paired differences with verdicts
    pruned = metrics["variants"]["pruned"]
    for task in ("embedded_code_mc", "embedded_prose_mc"):
        ci = pruned["intervals"][task]["acc"]
        assert 0.0 <= ci["low"] <= pruned["tasks"][task]["acc"] <= ci["high"] <= 1.0
        assert pruned["vs_original"]["tasks"][task]["acc"]["n"] == 4
        assert 0.0 <= pruned["vs_original"]["tasks"][task]["acc"]["p_value"] <= 1.0
    assert pruned["tokens_per_s_spread"]["rounds"] == 2 and pruned["speedup_interval"] is not None
    assert pruned["speedup_verdict"] in ("faster", "slower", "within noise")
    assert pruned["vs_original"]["average_accuracy"]["verdict"] in ("better", "worse", "within noise")
    assert "embedded_code_ppl" not in pruned["intervals"]  # one document per domain: no interval
    assert pruned["vs_original"]["tasks"]["embedded_code_ppl"]["bits_per_byte"]["interval"] is None
    assert set(metrics["variants"]["pruned"]["tasks"]) == {
        "embedded_code_mc",
        "embedded_code_ppl",
        "embedded_prose_mc",
        "embedded_prose_ppl",
    }
    for name in ("original.json", "pruned.json", "original.items.json", "pruned.items.json", "speed.json", "variants.json"):
        assert (bench / "results" / name).is_file(), name
    raw = json.loads((bench / "results" / "pruned.json").read_text())
    assert {"results", "configs", "versions", "n-shot"} <= set(raw)
    assert (
        "| Model | Experts | embedded_code_mc | embedded_prose_mc | Average | Memory (MB) | Speed-up |"
        in (bench / "report.md").read_text()
    )

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = json.loads((bench / "run.json").read_text())["run_id"]
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent}'", output_format="list"
    )
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"original", "pruned"}
    assert (
        by_name["pruned"].data.params["search.r"] == "6"
        and by_name["pruned"].data.params["search.strategy"] == "enumerate"
    )
    assert "search.r" not in by_name["original"].data.params
    assert by_name["original"].data.params["model.num_experts"] == "8"
    assert by_name["pruned"].data.metrics["average_accuracy"] == pytest.approx(
        metrics["variants"]["pruned"]["average_accuracy"]
    )
    assert "embedded_code_mc/acc" in by_name["original"].data.metrics
    assert by_name["pruned"].data.metrics["embedded_code_mc/acc_ci_low"] == pruned["intervals"]["embedded_code_mc"]["acc"]["low"]
    assert "vs_original/embedded_code_mc/acc/p_value" in by_name["pruned"].data.metrics
    assert by_name["pruned"].data.tags["verdict/speedup"] == pruned["speedup_verdict"]
    assert by_name["pruned"].data.tags["verdict/embedded_code_mc/acc"] in ("better", "worse", "within noise")
    assert "## Differences from `original`" in (bench / "report.md").read_text()

    dvc = [sys.executable, "-m", "dvc"]
    env = project_env(tmp_path)
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True, env=env)
    shown = subprocess.run(
        [*dvc, "metrics", "show", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert "average_accuracy" in shown.stdout
    shown_pruned = json.loads(shown.stdout)[""]["data"]["outputs/benchmark/metrics.json"]["data"]["variants"]["pruned"]
    assert shown_pruned["intervals"]["embedded_code_mc"]["acc"] == pruned["intervals"]["embedded_code_mc"]["acc"]
    plots = subprocess.run(
        [*dvc, "plots", "show", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    rendered = json.loads(plots.stdout)["data"]
    assert "Average accuracy vs weight memory" in rendered and "outputs/benchmark/plots/speedup.png" in rendered, list(
        rendered
    )
    assert math.isfinite(metrics["variants"]["pruned"]["tokens_per_s"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tasks", "expected"),
    [
        (["embedded", "no_such_task"], "error: benchmark: benchmark.tasks: unknown lm-eval task 'no_such_task'"),
        (["embedded"], "error: benchmark: "),  # with prose_ppl.jsonl removed below
    ],
)
def test_stage_fails_with_one_line(tmp_path, tasks, expected):
    _fake_upstream(tmp_path, {"benchmark": {"tasks": tasks, "variants": ["original"]}, "tracking": {"enabled": False}})
    if tasks == ["embedded"]:
        (tmp_path / "outputs" / "corpus" / "eval" / "prose_ppl.jsonl").unlink()
        expected += (
            f"{(tmp_path / 'outputs' / 'corpus' / 'eval' / 'prose_ppl.jsonl').resolve()}: embedded benchmark data"
        )
    proc = run_stage(tmp_path, "benchmark")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stderr[-2000:]
    assert not (tmp_path / "outputs" / "benchmark").exists()  # nothing half-written
