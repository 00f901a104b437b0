"""From an MLflow run back to its artifacts: clone its git commit, `dvc repro`, compare with the run's lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import mlflow_runs, run

pytestmark = pytest.mark.integration


@pytest.fixture
def clone_of_run(reproduced_copy: Path, tmp_path: Path):
    """A fresh clone at the logged run's `git_commit`, sharing the DVC cache (and run cache) of the original."""
    logged = mlflow_runs(reproduced_copy)[0]
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(reproduced_copy), str(clone)], tmp_path)
    run(["git", "checkout", "-q", logged.data.tags["git_commit"]], clone)
    run(["dvc", "cache", "dir", "--local", str(reproduced_copy / ".dvc" / "cache")], clone)
    return clone, logged


def test_clone_repro_matches_run_lineage(clone_of_run):
    clone, logged = clone_of_run
    run(["dvc", "repro"], clone)

    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    for stage_name, stage in lock["stages"].items():
        # The run was logged while evaluate ran, before DVC locked evaluate's own outputs.
        if stage_name == "evaluate":
            continue
        for entry in stage.get("deps", []) + stage.get("outs", []):
            assert logged.data.tags[f"dvc.md5.{entry['path']}"] == entry["md5"], entry["path"]

    evaluate = json.loads((clone / "metrics" / "evaluate.json").read_text())
    for key in ("fid_finetuned", "precision_finetuned", "recall_finetuned", "fid_control"):
        assert evaluate[key] == pytest.approx(logged.data.metrics[key]), key


def test_clone_has_logged_params(clone_of_run):
    clone, logged = clone_of_run
    params = yaml.safe_load((clone / "params.yaml").read_text())
    assert float(logged.data.params["threshold"]) == params["threshold"]
    assert logged.data.params["train_gan.epochs"] == str(params["train_gan"]["epochs"])
