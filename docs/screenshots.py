"""Screenshots of the MLflow UI for the README, taken in headless Chromium from runs that evadlab logged.

    pip install -e ".[docs]"        # playwright, the Python package only: it drives the system's Chromium
    mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db --workers 1
    evadlab tune experiments/sweeps/quickstart.yaml tracking.uri=http://127.0.0.1:5000 train.epochs=8 eval.every_epochs=4
    python docs/screenshots.py --tracking-uri http://127.0.0.1:5000 --experiment quickstart

writes ``docs/mlflow_runs_table.png`` (the runs table with evadlab's saved view), ``docs/mlflow_trade_off_charts.png``
(its charts: parallel coordinates, mAP against GFLOPs, val/mAP over steps) and ``docs/mlflow_compare_runs.png``
(MLflow's compare view of the runs), each 1600x900 and reduced to 256 colours.
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
from pathlib import Path

from mlflow.tracking import MlflowClient
from PIL import Image

from evadlab.platform.tracking import VIEW_KEY

# What a first visit would show over the page: MLflow's assistant panel, the telemetry banner; and the training view
# rather than the GenAI one.
BROWSER_STORAGE = {
    "mlflow.assistant.panelOpen_v1": "false",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    "mlflow.telemetry.info.alert.dismissed_v1": "true",
    "mlflow.settings.telemetry.enabled_v1": "false",
    "mlflow.workflowType_v1": '"machine_learning"',
}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


# A page's part to show, scrolled to the top of the app's inner scroll container: the saved view's own charts.
SCROLL_TO = {"mlflow_trade_off_charts.png": "EVAD trade-off"}


def pages(uri: str, experiment: str) -> dict[str, str]:
    """File name -> page of the MLflow UI: the runs table and charts of evadlab's saved view, and the compare view of
    the experiment's runs that have a frame-mAP (best first, at most 4)."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no experiment '{experiment}' at {uri}")
    runs = client.search_runs([found.experiment_id], filter_string="metrics.`val/mAP` >= 0",
                              order_by=["metrics.`val/mAP` DESC"], max_results=4)
    ids = urllib.parse.quote(json.dumps([run.info.run_id for run in runs]))
    base = f"{uri.rstrip('/')}/#/experiments/{found.experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
    return {
        "mlflow_runs_table.png": base,
        "mlflow_trade_off_charts.png": f"{base}&compareRunsMode=CHART",
        "mlflow_compare_runs.png": f"{uri.rstrip('/')}/#/compare-runs?runs={ids}"
                                   f"&experiments={urllib.parse.quote(json.dumps([found.experiment_id]))}",
    }


def shoot(shots: dict[str, str], out: Path, chromium: str, wait_s: float) -> None:
    """Each page in a fresh browser context with :data:`BROWSER_STORAGE`, after the page has settled."""
    from playwright.sync_api import sync_playwright

    storage = "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in BROWSER_STORAGE.items())
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        for name, url in shots.items():
            context = browser.new_context(viewport={"width": 1600, "height": 900})
            context.add_init_script(storage)
            page = context.new_page()
            page.goto(url, wait_until="networkidle", timeout=120_000)
            page.wait_for_timeout(wait_s * 1000)
            if name in SCROLL_TO:
                page.get_by_text(SCROLL_TO[name], exact=True).first.evaluate("e => e.scrollIntoView({block: 'start'})")
                page.wait_for_timeout(2000)
            page.screenshot(path=str(out / name))
            context.close()
            print(f"{out / name}: {url}")
        browser.close()


def reduce_colours(path: Path) -> None:
    """The screenshot in 256 colours (UI pages have few), about a third of the size."""
    with Image.open(path) as image:
        reduced = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    reduced.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True, help="an `mlflow server` with evadlab's runs")
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--wait", type=float, default=8.0, help="seconds for a page to draw its tables and charts")
    args = parser.parse_args()
    shots = pages(args.tracking_uri, args.experiment)
    shoot(shots, args.out, args.chromium, args.wait)
    for name in shots:
        reduce_colours(args.out / name)


if __name__ == "__main__":
    main()
