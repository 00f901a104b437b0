"""Check that the MLflow UI renders the compare view of two runs, in a real headless Chromium.

    .venv/bin/python scripts/check_mlflow_ui.py [--store mlflow.db] [--output ui-check]

Starts `mlflow ui` on 127.0.0.1 at a free port against the store and opens
the compare view of the experiment's two newest runs. It saves a screenshot
(compare.png) and the rendered DOM (compare.html) in the output folder and
exits with status 1 unless the DOM lists both run names. Without --store it
first logs two small runs into a new store in the output folder.

Needs Debian's chromium (`apt-get install chromium`). Not part of the test
suite: it starts a server and a browser and takes about a minute.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SERVER_START_TIMEOUT_S = 120
# Virtual time Chromium gives the single-page app to fetch the runs and render.
RENDER_BUDGET_MS = 20000
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_example_runs(store: Path, experiment: str) -> None:
    """Log two runs with different thresholds through rsft.tracking, as evaluate does."""
    import os

    import yaml

    from rsft import tracking
    from rsft.params import validate

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for threshold, fid in ((0.5, 21.0), (0.8, 19.5)):
        raw["threshold"] = threshold
        params = validate(raw)
        metrics = {"acceptance_rate": 1.0 - threshold, "fid_finetuned": fid, "fid_baseline": 22.0}
        tracking.log_run(experiment, params, metrics, {"device": "cpu"}, [], run_name=tracking.run_name(params))


def newest_runs(store: Path, experiment: str) -> tuple[str, list[tuple[str, str]]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"error: experiment {experiment!r} not found in {store}; pass --experiment")
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=2)
    if len(runs) < 2:
        raise SystemExit(f"error: experiment {experiment!r} in {store} has {len(runs)} run(s); the check needs 2")
    return found.experiment_id, [(run.info.run_id, run.info.run_name) for run in runs]


def wait_for_server(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: mlflow ui exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    raise SystemExit(f"error: mlflow ui did not respond at {url} within {SERVER_START_TIMEOUT_S} s")


def chromium(arguments: list[str], profile: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    if binary is None:
        raise SystemExit("error: chromium not found; install it with `apt-get install chromium`")
    command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={RENDER_BUDGET_MS}",
               *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, help="SQLite MLflow store (default: a new one with two example runs)")
    parser.add_argument("--experiment", default="rsft", help="experiment whose two newest runs are compared")
    parser.add_argument("--output", type=Path, default=Path("ui-check"), help="folder for compare.png and compare.html")
    arguments = parser.parse_args()
    arguments.output.mkdir(parents=True, exist_ok=True)

    store = arguments.store
    if store is None:
        store = arguments.output / "mlflow.db"
        store.unlink(missing_ok=True)
        log_example_runs(store, arguments.experiment)
    experiment_id, runs = newest_runs(store.resolve(), arguments.experiment)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{store.resolve()}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for_server(url, server)
        query = urllib.parse.urlencode({"runs": json.dumps([run_id for run_id, _ in runs]),
                                        "experiments": json.dumps([experiment_id])})
        compare_url = f"{url}/#/compare-runs?{query}"
        with tempfile.TemporaryDirectory() as profile:
            chromium(["--window-size=1600,1000", f"--screenshot={arguments.output.resolve() / 'compare.png'}",
                      compare_url], Path(profile) / "screenshot")
            dom = chromium(["--dump-dom", compare_url], Path(profile) / "dom").stdout
    finally:
        server.terminate()
        server.wait(timeout=30)

    (arguments.output / "compare.html").write_text(dom)
    missing = [name for _, name in runs if name not in dom]
    print(f"compare view: {compare_url}")
    print(f"screenshot: {arguments.output / 'compare.png'}")
    if missing:
        print(f"FAILED: the rendered compare view does not list run(s) {missing}", file=sys.stderr)
        sys.exit(1)
    print(f"OK: the rendered compare view lists both runs: {[name for _, name in runs]}")


if __name__ == "__main__":
    main()
