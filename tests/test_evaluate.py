"""Benchmark library: our lm-eval tasks run offline through real lm-eval, speed/memory, metrics, report."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import VARIANTS, BenchmarkParams, SpeedParams
from pipeline.errors import PipelineError
from pipeline.evaluate.lmeval import (
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
    render_report,
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
        raw, rows = evaluate_model(model, tok, sel, batch_size=8)
    return {"raw": raw, "rows": rows, "model": model, "tok": tok, "eval_dir": eval_dir}


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


def _results() -> list[VariantResult]:
    tasks = {
        "embedded_code_mc": {"acc": 0.5, "acc_norm": 0.25},
        "embedded_code_ppl": {"word_perplexity": 12.0, "bits_per_byte": 1.5},
    }
    pruned = {
        "embedded_code_mc": {"acc": 0.4, "acc_norm": 0.3},
        "embedded_code_ppl": {"word_perplexity": 15.0, "bits_per_byte": 1.7},
    }
    return [
        VariantResult(
            "original",
            tasks,
            weight_bytes=8_000_000,
            experts_per_layer=8,
            tokens_per_s=100.0,
            peak_rss_bytes=10**9,
            expert_evals_per_token=2.0,
        ),
        VariantResult(
            "pruned",
            pruned,
            weight_bytes=6_000_000,
            experts_per_layer=6,
            tokens_per_s=125.0,
            peak_rss_bytes=9 * 10**8,
            expert_evals_per_token=2.0,
        ),
        VariantResult(
            "pruned_skip",
            pruned,
            weight_bytes=6_000_000,
            experts_per_layer=6,
            tokens_per_s=float("nan"),
            expert_evals_per_token=1.5,
            skipped_fraction=0.25,
        ),
    ]


def test_metrics_schema():
    metrics = build_metrics(_results())
    check_metrics(metrics)
    v = metrics["variants"]
    assert set(v) == {"original", "pruned", "pruned_skip"}
    assert v["original"]["speedup"] == 1.0 and v["pruned"]["speedup"] == pytest.approx(1.25)
    assert v["pruned_skip"]["tokens_per_s"] is None and v["pruned_skip"]["speedup"] is None  # non-finite -> null
    assert v["original"]["average_accuracy"] == 0.5
    assert v["original"]["tasks"]["embedded_code_ppl"]["bits_per_byte"] == 1.5
    json.loads(dumps_json(metrics))  # strict JSON, no NaN
    bad = json.loads(dumps_json(metrics))
    del bad["variants"]["pruned"]["weight_bytes"]
    with pytest.raises(PipelineError, match="'pruned' lacks weight_bytes"):
        check_metrics(bad)
    with pytest.raises(PipelineError, match="non-empty"):
        check_metrics({"variants": {}})


def test_report_has_paper_layout_and_plots(tmp_path):
    metrics = build_metrics(_results())
    text = render_report(metrics, {"speed": "greedy"})
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| Model | Experts"))
    assert header == "| Model | Experts | embedded_code_mc | Average | Memory (MB) | Speed-up |"
    assert "| original | 8 | 50.00 | 50.00 | 8.0 | 1.00x |" in lines
    assert "| pruned | 6 | 40.00 | 40.00 | 6.0 | 1.25x |" in lines
    assert "| pruned_skip | 6 | 40.00 | 40.00 | 6.0 | - |" in lines
    assert any(line.startswith("| Model | embedded_code_ppl bits_per_byte") for line in lines)
    big = build_metrics(
        [VariantResult("original", {"boolq": {"acc": 0.85}}, weight_bytes=89_900_000_000, tokens_per_s=10.0)]
    )
    assert "| original | - | 85.00 | 85.00 | 89.9 | 1.00x |" in render_report(big).splitlines()
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
    speed = json.loads((tmp_path / "plots" / "speedup.json").read_text())
    assert [r["variant"] for r in speed] == ["original", "pruned"]


def test_skip_variants_evaluate_and_count_fewer_experts(tmp_path):
    """All four variants through the runner."""
    from pipeline.evaluate.runner import (
        BenchmarkSetup,
        build_variants,
        run_benchmark,
    )

    original = save_tiny_checkpoint(tmp_path / "original", seed=0)
    pruned = save_tiny_checkpoint(tmp_path / "pruned", seed=0, num_experts=6)
    eval_dir = write_eval_data(tmp_path / "eval", mc_items=3, ppl_docs=1)
    layers = {str(i): 0.9 for i in range(2)}
    variants = build_variants(list(VARIANTS), original, pruned, {"original": layers, "pruned": layers})
    assert [(v.name, v.pruned, v.skip) for v in variants] == [
        ("original", False, False),
        ("original_skip", False, True),
        ("pruned", True, False),
        ("pruned_skip", True, True),
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
    assert set(results["original_skip"].tasks) == set(results["original"].tasks)


def test_build_variants_errors(tmp_path):
    with pytest.raises(PipelineError, match=r"thresholds.json: no 'pruned' thresholds for variant pruned_skip"):
        build_variants(["pruned_skip"], tmp_path, tmp_path, {"original": {"0": 0.5}})
    variants = build_variants(["original", "pruned"], tmp_path / "a", tmp_path / "b", None)
    assert [v.checkpoint.name for v in variants] == ["a", "b"] and not any(v.skip for v in variants)


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
    write_run_records(root, "corpus", "model", "search", "export", "skip_calibration")


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
    assert set(metrics["variants"]["pruned"]["tasks"]) == {
        "embedded_code_mc",
        "embedded_code_ppl",
        "embedded_prose_mc",
        "embedded_prose_ppl",
    }
    for name in ("original.json", "pruned.json", "speed.json", "variants.json"):
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

    dvc = [sys.executable, "-m", "dvc"]
    env = project_env(tmp_path)
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True, env=env)
    shown = subprocess.run(
        [*dvc, "metrics", "show", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert "average_accuracy" in shown.stdout
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
