"""The user's daily loop as the user sees it: two pipeline runs (search.r 6 and 4) compared in the
MLflow UI, in a real headless Chromium driven by Playwright.

`mlflow server` serves the project's own store (`mlflow.db`, artifacts under `mlartifacts/`); the
test opens MLflow's compare-runs page for the two `pruned` benchmark child runs and reads, from the
rendered page, the differing params and each run's benchmark metrics. The screenshot lands in
`test-artifacts/mlflow-compare.png` (CI keeps it). Chromium is Debian's `chromium` (`.ci/run`
installs it); the test fails in CI without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.project import ROOT, mlflow_server

pytestmark = pytest.mark.slow

EXPERIMENT = "moe-expert-pruning"
ARTIFACTS = ROOT / "test-artifacts"
#: Flags that keep Chromium quiet on a closed network (without them it hangs on background requests).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
#: Benchmark metrics a person compares between the two pruned models.
METRICS = ("average_accuracy", "tokens_per_s", "speedup", "weight_bytes", "experts_per_layer")

# Every cell of MLflow's virtualised metrics grid, scrolled through (only visible rows are in the DOM).
_COLLECT_GRID = """async () => {
  const grids = Array.from(document.querySelectorAll('.ReactVirtualized__Grid'));
  const cells = [];
  const grab = () => grids.forEach((g) => g.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')
    .forEach((c) => cells.push({top: parseFloat(c.style.top), left: parseFloat(c.style.left),
                                text: c.innerText.trim(), name: !!c.querySelector('a[title="Plot chart"]')})));
  const height = Math.max(...grids.map((g) => g.scrollHeight));
  const step = Math.max(20, Math.min(...grids.map((g) => g.clientHeight)) / 2);
  for (let y = 0; ; y += step) {
    grids.forEach((g) => { g.scrollTop = y; });
    await new Promise((r) => setTimeout(r, 150));
    grab();
    if (y >= height) break;
  }
  return cells;
}"""
_SCROLL_GRIDS = "(y) => document.querySelectorAll('.ReactVirtualized__Grid').forEach((g) => { g.scrollTop = y; })"


def chromium_executable() -> str:
    """Debian's Chromium (or $CHROMIUM); fails in CI, skips elsewhere, when it is missing."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        message = "Chromium not found: apt-get install -y chromium (.ci/run installs it), or set CHROMIUM"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def pruned_runs(store: str) -> dict[int, Any]:
    """The `pruned` benchmark child run of each search.r, newest first per r."""
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, f"no experiment {EXPERIMENT!r} in {store}"
    runs = client.search_runs(
        [exp.experiment_id], "tags.variant = 'pruned' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    by_r: dict[int, Any] = {}
    for r in runs:
        by_r.setdefault(int(r.data.params["search.r"]), r)
    return by_r


def metric_table(cells: list[dict[str, Any]]) -> dict[str, list[str]]:
    """``metric -> [value shown for run 1, run 2, ...]`` from the grid's cells (rows share ``top``)."""
    names = {c["top"]: c["text"] for c in cells if c["name"]}
    values: dict[float, dict[float, str]] = {}
    for c in cells:
        if not c["name"] and c["text"]:
            values.setdefault(c["top"], {})[c["left"]] = c["text"]
    return {name: [v for _, v in sorted(values.get(top, {}).items())] for top, name in names.items()}


def test_mlflow_ui_compares_two_pipeline_runs(compared_project: Path, tmp_path: Path) -> None:
    chromium = chromium_executable()
    from playwright.sync_api import sync_playwright

    store = f"sqlite:///{compared_project / 'mlflow.db'}"
    by_r = pruned_runs(store)
    assert set(by_r) >= {6, 4}, f"pruned runs found for search.r = {sorted(by_r)}"
    runs = [by_r[6], by_r[4]]
    ids = [r.info.run_id for r in runs]
    experiments = sorted({r.info.experiment_id for r in runs})
    shot = tmp_path / "mlflow-compare.png"

    with mlflow_server(store, cwd=compared_project, log=tmp_path / "server.log") as url:
        # The server serves the project's own artifact root (mlartifacts/): the r=4 benchmark's figure.
        parent = runs[1].data.tags["mlflow.parentRunId"]
        query = urllib.parse.urlencode({"path": "plots/speedup.png", "run_uuid": parent})
        with urllib.request.urlopen(f"{url}/get-artifact?{query}", timeout=30) as resp:  # noqa: S310 - loopback
            served = resp.read()
        assert served == (compared_project / "outputs" / "benchmark" / "plots" / "speedup.png").read_bytes()

        page_url = f"{url}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps(experiments)}"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 2000})
                page.goto(page_url)
                page.get_by_text("Run details").wait_for(timeout=90_000)
                for run_id in ids:
                    page.get_by_text(run_id).first.wait_for(timeout=30_000)
                page.get_by_text("average_accuracy").first.wait_for(timeout=30_000)
                close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
                if close.count():  # MLflow 3's assistant side panel hides half the page
                    close.first.click()

                text = page.inner_text("body")
                assert "Comparing 2 Runs" in text
                # Parameters table: one column per run, in the order of the URL (r=6, then r=4).
                assert re.search(r"search\.r\s+6\s+4\b", text), text[:3000]
                assert re.search(r"experts_per_layer\s+6\s+4\b", text)

                table = metric_table(page.evaluate(_COLLECT_GRID))
                for key in METRICS:
                    assert key in table, f"metric {key} not on the page: {sorted(table)}"
                    shown = [float(v) for v in table[key]]
                    stored = [r.data.metrics[key] for r in runs]
                    # MLflow shows 3 decimals or 4 significant digits, whichever is coarser
                    assert shown == pytest.approx(stored, rel=2e-3, abs=6e-4), (key, shown, stored)
                assert table["experts_per_layer"] == ["6", "4"]

                # What a person looks at: speed next to accuracy in the parallel-coordinates plot,
                # and only what differs in the tables, side by side.
                metrics_select = page.locator(".du-bois-light-select", has_text="average_accuracy").first
                metrics_select.click()
                page.keyboard.type("tokens_per_s")
                page.keyboard.press("Enter")
                page.keyboard.press("Escape")
                page.locator(".du-bois-light-select-selection-item", has_text="tokens_per_s").wait_for(timeout=10_000)
                page.get_by_role("switch", name="Parameters - Show diff only").click()
                page.get_by_role("switch", name="Metrics - Show diff only").click()
                deadline = time.monotonic() + 10
                while "model.fingerprint" in page.inner_text("body") and time.monotonic() < deadline:
                    time.sleep(0.2)
                diff_text = page.inner_text("body")
                assert "model.fingerprint" not in diff_text, "equal params still shown with 'Show diff only'"
                assert re.search(r"search\.r\s+6\s+4\b", diff_text)
                page.evaluate(_SCROLL_GRIDS, 10_000)  # the timing rows sit at the end of the list
                page.wait_for_timeout(300)
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()

    assert shot.stat().st_size > 20_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy2(shot, ARTIFACTS / "mlflow-compare.png")
