"""Shared fixtures: a copy of this repository with tiny params, run by the real DVC and MLflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

# Params small enough for the whole pipeline to run in well under a minute on
# two CPU cores. A 2-epoch GAN is so weak that its discriminator separates
# fakes from reals almost perfectly and calibrated p of fakes sits near 0, so
# no fixed positive threshold reliably keeps fakes. Threshold 0 keeps every
# fake with p > 0; tests that need a real filter pick a threshold from the
# observed scores (see median_threshold).
TINY_OVERRIDES = {
    "threshold": 0.0,
    "device": "cpu",
    "data": {"limit": 600, "validation_size": 400},
    "train_evaluator": {"epochs": 1},
    "train_gan": {"epochs": 2, "batch_size": 64, "base_channels": 8, "log_every": 5},
    "generate": {"num_samples": 400, "batch_size": 200},
    "score": {"num_calibration": 200},
    "finetune": {"steps": 6, "batch_size": 32},
    "evaluate": {"num_samples": 120, "batch_size": 200, "max_draws_per_sample": 50},
}


def merge(base: dict, overrides: dict) -> dict:
    """Return base with nested overrides applied."""
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = merge(base[key], value) if isinstance(value, dict) else value
    return merged


def tool_env(root: Path) -> dict[str, str]:
    """Environment for DVC subprocesses: this interpreter's bin first, no outside MLflow store."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "rsft tests"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "tests@localhost"
    return env


def run(command: list[str], cwd: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command in `cwd`; on failure, show its output in the assertion message."""
    result = subprocess.run(command, cwd=cwd, env=tool_env(cwd), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited with {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def make_tiny_repo(destination: Path, overrides: dict | None = None) -> Path:
    """Copy the tracked files of this repository into a new git repo with tiny params."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for name in filter(None, tracked):
        source = REPO_ROOT / name
        if not source.is_file() or name.startswith(("data/", "metrics/", "plots/")) or name == "dvc.lock":
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    (destination / "data").mkdir(exist_ok=True)
    shutil.copy2(REPO_ROOT / "data" / ".gitignore", destination / "data" / ".gitignore")

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params = merge(merge(params, TINY_OVERRIDES), overrides or {})
    (destination / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    run(["git", "init", "-q", "-b", "main"], destination)
    run(["git", "add", "-A"], destination)
    run(["git", "commit", "-q", "-m", "tiny config"], destination)
    return destination


@pytest.fixture(scope="session")
def reproduced_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny repository on which `dvc repro` has run once; tests must not change it."""
    root = make_tiny_repo(tmp_path_factory.mktemp("reproduced"))
    run(["dvc", "repro"], root)
    return root


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    """A fresh tiny repository, not yet reproduced."""
    return make_tiny_repo(tmp_path / "repo")


@pytest.fixture
def reproduced_copy(reproduced_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the reproduced repository (git, DVC cache, MLflow store and all)."""
    import sqlite3

    root = Path(shutil.copytree(reproduced_repo, tmp_path / "copy", symlinks=True))
    # MLflow stores an experiment's artifact location as an absolute URI, so the
    # copied store would still write into the original; point it at the copy.
    with sqlite3.connect(root / "mlflow.db") as database:
        database.execute("UPDATE experiments SET artifact_location = ?", ((root / "mlartifacts").as_uri(),))
    return root


def mlflow_runs(root: Path, experiment: str = "rsft") -> list:
    """All runs of an experiment in the repository's SQLite MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"experiment {experiment!r} missing from {root / 'mlflow.db'}"
    return client.search_runs([found.experiment_id], run_view_type=3)


def median_threshold(root: Path) -> str:
    """A threshold that keeps about half of the scored fakes of a reproduced repository."""
    import numpy as np
    import pandas as pd

    p = pd.read_parquet(root / "data" / "scores" / "scores.parquet")["p_calibrated"].to_numpy()
    return f"{float(np.median(p)):.6g}"
