"""A queued threshold sweep run by two DVC queue workers: one complete MLflow run per experiment, and the report."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import mlflow_runs, run

pytestmark = pytest.mark.integration

QUEUE_TIMEOUT_S = 1200
# Quantiles of the scored fakes' calibrated p: every threshold keeps between
# 50% and 90% of the fakes, whatever the tiny GAN's scores are.
KEPT_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5)


def sweep_thresholds(root: Path) -> list[str]:
    p = pd.read_parquet(root / "data" / "scores" / "scores.parquet")["p_calibrated"].to_numpy()
    # The "e" format always has a dot and a signed exponent, so YAML reads it back as a float.
    return [f"{value:.6e}" for value in np.quantile(p, KEPT_QUANTILES)]


def wait_for_queue(root: Path) -> str:
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], root).stdout
        if not any(state in status for state in ("Queued", "Running")):
            return status
        time.sleep(5)
    run(["dvc", "queue", "stop", "--kill"], root, check=False)
    raise AssertionError(f"queued experiments not done after {QUEUE_TIMEOUT_S} s:\n{status}")


@pytest.fixture(scope="module")
def swept_repo(reproduced_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The reproduced tiny repository, committed as a baseline, after a five-threshold queued sweep and report."""
    root = Path(shutil.copytree(reproduced_repo, tmp_path_factory.mktemp("sweep") / "repo", symlinks=True))
    # MLflow stores an experiment's artifact location as an absolute URI, so the
    # copied store still points at the original; point it at the copy's folder.
    with sqlite3.connect(root / "mlflow.db") as database:
        database.execute("UPDATE experiments SET artifact_location = ?", ((root / "mlartifacts").as_uri(),))
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "reproduced baseline"], root)

    thresholds = sweep_thresholds(root)
    for threshold in thresholds:
        run(["dvc", "exp", "run", "--queue", "-S", f"threshold={threshold}"], root)
    run(["dvc", "queue", "start", "-j", "2"], root)
    status = wait_for_queue(root)
    assert status.count("Success") == len(thresholds), status

    run(["python", "-m", "rsft.report", "--output", "reports"], root)
    return root, thresholds


def sweep_runs(root: Path) -> list:
    return [r for r in mlflow_runs(root) if r.data.tags.get("dvc_exp_name")]


def test_sweep_logs_one_run_per_threshold(swept_repo):
    root, thresholds = swept_repo
    logged = sorted(float(r.data.params["threshold"]) for r in sweep_runs(root))
    assert logged == pytest.approx(sorted(float(t) for t in thresholds))


def test_sweep_runs_all_finished(swept_repo):
    root, _ = swept_repo
    statuses = [r.info.status for r in mlflow_runs(root)]
    assert statuses == ["FINISHED"] * 6


def test_sweep_runs_complete(swept_repo):
    root, _ = swept_repo
    runs = sweep_runs(root)
    params, metrics = set(runs[0].data.params), set(runs[0].data.metrics)
    assert {"fid_finetuned", "acceptance_rate", "rsft_overhead", "cost.train_gan.wall_time_s"} <= metrics
    for logged in runs:
        name = logged.data.tags["dvc_exp_name"]
        assert set(logged.data.params) == params, name
        assert set(logged.data.metrics) == metrics, name
        assert logged.data.tags["cost.train_gan.source"] == "repository root", name
        assert logged.data.tags["cost.reject.source"] == "workspace", name


def test_sweep_runs_artifacts_in_main_store(swept_repo):
    root, _ = swept_repo
    for logged in sweep_runs(root):
        folder = Path(logged.info.artifact_uri.removeprefix("file://"))
        assert folder.is_relative_to(root / "mlartifacts"), folder
        assert (folder / "dvc.lock").is_file()
        assert (folder / "params.yaml").is_file()


def test_sweep_runs_link_experiment_commit(swept_repo):
    root, _ = swept_repo
    for logged in sweep_runs(root):
        commit = logged.data.tags["dvc_exp_commit"]
        params = yaml.safe_load(run(["git", "show", f"{commit}:params.yaml"], root).stdout)
        assert params["threshold"] == pytest.approx(float(logged.data.params["threshold"]))


def test_report_lists_every_threshold(swept_repo):
    root, thresholds = swept_repo
    with open(root / "reports" / "tradeoff.csv") as table:
        rows = list(csv.DictReader(table))
    assert sorted(float(row["threshold"]) for row in rows) == pytest.approx([0.0, *sorted(map(float, thresholds))])
    assert (root / "reports" / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_seed_table_per_threshold(swept_repo):
    root, thresholds = swept_repo
    summary = pd.read_csv(root / "reports" / "seeds.csv")
    assert sorted(summary["threshold"]) == pytest.approx([0.0, *sorted(map(float, thresholds))])
    assert summary["num_seeds"].tolist() == [1] * (len(thresholds) + 1)
    assert summary["fid_finetuned_mean"].notna().all()
    assert "± " not in (root / "reports" / "seeds.md").read_text()


def test_exp_apply_reproduces_run(swept_repo):
    root, _ = swept_repo
    logged = sweep_runs(root)[0]
    run(["dvc", "exp", "apply", logged.data.tags["dvc_exp_name"]], root)

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    for stage_name, stage in lock["stages"].items():
        if stage_name == "evaluate":
            continue
        for entry in stage.get("outs", []):
            assert logged.data.tags[f"dvc.md5.{entry['path']}"] == entry["md5"], entry["path"]
    evaluate = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert evaluate["fid_finetuned"] == pytest.approx(logged.data.metrics["fid_finetuned"])
    assert "Data and pipelines are up to date" in run(["dvc", "repro"], root).stdout
