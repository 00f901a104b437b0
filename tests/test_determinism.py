"""Two `dvc repro --force` runs with equal params on one machine give equal artifacts and metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import run

pytestmark = pytest.mark.integration

# Wall times and memory peaks differ on every run; they live outside dvc.lock on purpose.
TIMING_FILES = ("metrics/costs.json",)


def output_hashes(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {entry["path"]: entry["md5"] for stage in lock["stages"].values() for entry in stage.get("outs", [])}


def metrics_files(root: Path) -> dict[str, dict]:
    return {
        str(path.relative_to(root)): json.loads(path.read_text())
        for path in sorted((root / "metrics").glob("*.json"))
        if str(path.relative_to(root)) not in TIMING_FILES
    }


@pytest.fixture(scope="module")
def forced_copy(reproduced_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the reproduced repository with the first run committed, after a second `dvc repro --force`."""
    root = Path(shutil.copytree(reproduced_repo, tmp_path_factory.mktemp("forced") / "repo", symlinks=True))
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "first run as the reference"], root)
    run(["dvc", "repro", "--force"], root)
    return root


def test_forced_repro_same_output_hashes(reproduced_repo, forced_copy):
    first, second = output_hashes(reproduced_repo), output_hashes(forced_copy)
    assert first.keys() == second.keys()
    for path in first:
        assert first[path] == second[path], path


def test_forced_repro_same_metrics(reproduced_repo, forced_copy):
    assert metrics_files(reproduced_repo) == metrics_files(forced_copy)


def test_forced_repro_lock_unchanged(forced_copy):
    assert run(["git", "diff", "--stat", "dvc.lock"], forced_copy).stdout == ""


def test_forced_repro_metrics_diff_only_costs(forced_copy):
    changed = json.loads(run(["dvc", "metrics", "diff", "--json"], forced_copy).stdout or "{}")
    assert set(changed) <= set(TIMING_FILES), changed
