"""`make compare`: run the comparison grid of compare.yaml as DVC experiments, then summarise it.

    python scripts/compare.py [--grid compare.yaml] [--out outputs/compare] [--fresh] [--summary-only]

Needs a reproduced workspace (`make repro`): the default run's `original` benchmark is the reference
every pruned model is paired with. Each grid point is one `dvc exp run -n cmp-<strategy>-r<r>-<set>`
in this workspace (only the stages its settings change rerun; each stage is an MLflow run tagged
with the experiment's name). What each run wrote is kept under --out/runs/, so an interrupted grid
resumes where it stopped; --fresh starts over. The workspace (params.yaml, dvc.lock, every output)
is put back as it was when the grid ends, even when a run fails. The summary (table, Spearman
correlations, paired verdicts on the paper's claims, plot) is written to --out and logged as one
MLflow run. Why experiments run in the workspace and not from `dvc queue`: docs/compare.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipeline import compare  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.evaluate.report import BASELINE  # noqa: E402
from pipeline.evaluate.runner import ITEMS_SUFFIX  # noqa: E402
from pipeline.io import read_json, write_json  # noqa: E402
from pipeline.tracking import StageRun, default_artifact_root, default_tracking_uri  # noqa: E402

log = logging.getLogger("compare")
BENCHMARK = Path("outputs/benchmark")
RUN_RECORDS = {"search": "outputs/search/run.json", "export": "outputs/export/run.json",
               "benchmark": "outputs/benchmark/run.json"}


def dvc(*args: str, log_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    """A dvc command in the workspace; its output goes to ``log_file`` when given."""
    if log_file is None:
        return subprocess.run(["dvc", *args], capture_output=True, text=True)
    with open(log_file, "w", encoding="utf-8") as fh:
        return subprocess.run(["dvc", *args], stdout=fh, stderr=subprocess.STDOUT, text=True)


def uncached_paths() -> list[Path]:
    """Every stage output DVC does not cache (run records, metrics, the benchmark's report): what
    `dvc checkout` cannot restore."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return sorted({Path(out.fs_path).relative_to(ROOT) for stage in repo.index.stages for out in stage.outs
                       if not out.use_cache})


@contextlib.contextmanager
def workspace_restored(keep: Path) -> Iterator[None]:
    """Put params.yaml, dvc.lock and every output back as they are now when the block ends."""
    keep.mkdir(parents=True, exist_ok=True)
    saved = [Path("params.yaml"), Path("dvc.lock"), *uncached_paths()]
    # DVC stages what an experiment changes (core.autostage): git's index is put back too, or the next
    # `dvc exp run` cannot apply its stash over a staged params.yaml
    index = Path(subprocess.run(["git", "rev-parse", "--git-path", "index"], capture_output=True, text=True,
                                check=True).stdout.strip())
    if index.exists():
        shutil.copy2(index, keep / "git-index")
    for rel in saved:
        target = keep / rel
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if (ROOT / rel).is_dir():
            shutil.copytree(ROOT / rel, target)
        elif (ROOT / rel).exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, target)
    try:
        yield
    finally:
        for rel in saved:
            if not (keep / rel).exists():
                continue
            dest = ROOT / rel
            if dest.is_dir():
                shutil.rmtree(dest)
            if (keep / rel).is_dir():
                shutil.copytree(keep / rel, dest)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(keep / rel, dest)
        if (keep / "git-index").exists():
            shutil.copy2(keep / "git-index", index)
        res = dvc("checkout", "--quiet")
        if res.returncode != 0:
            log.error("dvc checkout after the grid failed: %s", (res.stderr or res.stdout).strip()[-500:])
        shutil.rmtree(keep, ignore_errors=True)


def check_reproduced() -> None:
    """The workspace must be reproduced and unchanged: the grid starts from it and returns to it."""
    res = dvc("status", "--json")
    if res.returncode != 0:
        raise PipelineError(f"dvc status failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    if json.loads(res.stdout or "{}"):
        raise PipelineError("the pipeline is not up to date (dvc status): run `make repro` before `make compare`")
    metrics = ROOT / BENCHMARK / "metrics.json"
    if not metrics.exists() or BASELINE not in read_json(metrics, what="benchmark metrics").get("variants", {}):
        raise PipelineError(f"{metrics}: no {BASELINE!r} variant to compare with (benchmark.variants must include it)")


def model_hash() -> str:
    """The hash dvc.lock records for the model checkpoint: grid runs are paired only with their own model."""
    lock = yaml.safe_load(Path("dvc.lock").read_text(encoding="utf-8"))
    outs = lock["stages"]["model"]["outs"]
    return next(str(o["md5"]) for o in outs if o["path"] == "outputs/model/checkpoint")


def harvest(point: compare.GridPoint) -> dict:
    """What the run that just finished wrote, as the summary keeps it."""
    run_ids = {}
    for stage, path in RUN_RECORDS.items():
        with contextlib.suppress(OSError, ValueError, PipelineError):
            run_ids[stage] = read_json(ROOT / path).get("run_id")
    return compare.run_record(
        point,
        read_json(ROOT / "outputs/search/metrics.json", what="search metrics"),
        read_json(ROOT / BENCHMARK / "metrics.json", what="benchmark metrics"),
        read_json(ROOT / BENCHMARK / "results" / f"{compare.PRUNED}{ITEMS_SUFFIX}", what="per-document scores"),
        run_ids,
    )


def kept_experts() -> list[list[int]]:
    """The kept expert ids of every MoE layer in the workspace's current selection."""
    return [layer["kept"] for layer in read_json(ROOT / "outputs/search/selection.json", what="pruning selection")["layers"]]


def run_grid(grid: compare.Grid, out: Path) -> None:
    """Every grid point not finished yet, as a DVC experiment; the workspace is restored afterwards.

    A point first runs up to ``search``. When it keeps the same experts as a finished point of the
    same r and calibration set, its pruned model is that point's, byte for byte in its weights: the
    point shares that benchmark (``shared_with``) and its experiment ends at ``search``. Otherwise
    the experiment is run again in full (search is up to date: export, skip_calibration, benchmark).
    """
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    done = {p.name: read_json(runs / f"{p.name}.json") for p in grid.points if (runs / f"{p.name}.json").exists()}
    todo = [p for p in grid.points if p.name not in done]
    if not todo:
        log.info("all %d grid runs are done (--fresh to rerun them)", len(grid.points))
        return
    (out / "logs").mkdir(exist_ok=True)
    with workspace_restored(out / ".workspace"):
        bar = tqdm(todo, desc="compare", unit="run", mininterval=5)
        for point in bar:
            bar.set_postfix_str(point.name)
            log_file = out / "logs" / f"{point.name}.log"
            started = time.monotonic()
            for phase in ("search", None):
                dvc("exp", "remove", point.name)   # an interrupted earlier attempt, or the search-only phase
                res = dvc("exp", "run", "-n", point.name, *grid.set_args(point), *([phase] if phase else []),
                          log_file=log_file.with_suffix(f".{phase}.log") if phase else log_file)
                if res.returncode != 0:
                    raise PipelineError(f"{point.name}: dvc exp run failed (exit {res.returncode}); log in {out / 'logs'}")
                kept = kept_experts()
                same = next((r for r in done.values() if r.get("kept") == kept and r["r"] == point.r
                             and r["calibration"] == point.calibration and not r.get("shared_with")), None)
                if phase and same is not None:
                    search = read_json(ROOT / "outputs/search/metrics.json", what="search metrics")
                    record = compare.run_record(point, search, same["benchmark"], same["items"],
                                                {**same["mlflow_runs"], "search": read_json(ROOT / RUN_RECORDS["search"]).get("run_id")})
                    record["shared_with"] = same["name"]
                    break
            else:
                record = harvest(point)
            record.update(kept=kept, seconds=round(time.monotonic() - started, 1))
            done[point.name] = record
            write_json(runs / f"{point.name}.json", record)
            bpb = [m["bits_per_byte"] for m in record["benchmark"]["variants"][compare.PRUNED]["tasks"].values()
                   if "bits_per_byte" in m]
            log.info("%s: search loss %.4g, mean bits/byte %.3f (%.0f s%s)", point.name, record["search_loss"],
                     sum(bpb) / max(len(bpb), 1), record["seconds"],
                     f", same experts as {record['shared_with']}" if record.get("shared_with") else "")


def summarise(grid: compare.Grid, out: Path, params: dict) -> dict:
    """The summary of every finished grid run, written to ``out`` and logged as one MLflow run."""
    reference = read_json(out / "reference" / "metrics.json", what="reference benchmark metrics")
    original = compare.variant_result(
        BASELINE, reference, read_json(out / "reference" / f"{BASELINE}{ITEMS_SUFFIX}", what="reference scores"))
    done = [read_json(out / "runs" / f"{p.name}.json") for p in grid.points if (out / "runs" / f"{p.name}.json").exists()]
    summary = compare.summarise(original, done, reference, best=grid.best)
    summary["grid"] = {"runs": len(grid.points), "finished": len(done), "overrides": dict(grid.overrides)}
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(compare.render_markdown(summary), encoding="utf-8")
    figure = compare.plot(summary, out / "compare.png")
    tracking = params.get("tracking") or {}
    uri = default_tracking_uri(ROOT)
    with StageRun("compare", tracking.get("experiment", "moe-expert-pruning"), uri,
                  artifact_root=default_artifact_root(uri, ROOT), params=compare.grid_params(grid),
                  tags={"grid.finished": len(done)}, enabled=bool(tracking.get("enabled", True))) as run:
        run.log_metrics(compare.flat_summary_metrics(summary))
        run.set_tags({f"run.{r['name']}.{stage}": rid for r in summary["rows"] for stage, rid in r["mlflow_runs"].items() if rid})
        for path in (out / "summary.md", out / "summary.json", figure):
            run.log_artifact(path)
    log.info("summary: %s, %s, %s (%d of %d runs)", out / "summary.md", out / "summary.json", figure, len(done), len(grid.points))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="compare.yaml", help="grid file (default: compare.yaml)")
    ap.add_argument("--out", default="outputs/compare", help="where runs, logs and the summary go")
    ap.add_argument("--fresh", action="store_true", help="forget finished runs and run the whole grid again")
    ap.add_argument("--summary-only", action="store_true", help="summarise the finished runs; run nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.chdir(ROOT)
    out = Path(args.out)
    try:
        params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
        grid = compare.load_grid(args.grid, params)
        if not args.summary_only:
            check_reproduced()
            if args.fresh and out.exists():
                shutil.rmtree(out)
            model = model_hash()
            stamp = out / "reference" / "model.md5"
            if stamp.exists() and stamp.read_text().strip() != model:
                raise PipelineError(f"{out}: its runs were made with another model (outputs/model changed): rerun with --fresh")
            (out / "reference").mkdir(parents=True, exist_ok=True)
            stamp.write_text(model + "\n")
            shutil.copy2(BENCHMARK / "metrics.json", out / "reference" / "metrics.json")
            shutil.copy2(BENCHMARK / "results" / f"{BASELINE}{ITEMS_SUFFIX}", out / "reference" / f"{BASELINE}{ITEMS_SUFFIX}")
            run_grid(grid, out)
        summarise(grid, out, params)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
