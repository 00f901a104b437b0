"""Interruption: SIGKILL during train_gan and generate under `dvc repro`, SIGTERM during evaluate's MLflow run.

Stages are stopped at a known moment through the RSFT_TEST_PAUSE_AT pause
points of rsft.runtime: the process logs "paused at <point>" and sleeps, and
the test kills or signals it then.
"""

import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from rsft.runtime import PAUSE_ENV, atomic_path
from tests.conftest import mlflow_runs, run, tool_env

PAUSE_TIMEOUT_S = 300


class PausedProcess:
    """A command started in its own process group that is waited on until it reaches a pause point."""

    def __init__(self, command: list[str], root: Path, pause_at: str) -> None:
        env = tool_env(root)
        env[PAUSE_ENV] = pause_at
        self.pause_at = pause_at
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self.process = subprocess.Popen(
            command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_pause(self) -> None:
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if f"paused at {self.pause_at}" in line:
                return
        self.process.kill()
        raise AssertionError(f"never paused at {self.pause_at!r}:\n{''.join(self.lines)}")

    def finish(self) -> tuple[int, str]:
        returncode = self.process.wait(timeout=60)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return returncode, "".join(self.lines)


def lock_entry(root: Path, stage: str) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]


def temporaries(root: Path) -> list[Path]:
    return [path for path in root.rglob(".*.tmp-*") if ".dvc" not in path.parts]


def kill_at(root: Path, stage: str, pause_at: str) -> None:
    """Run `dvc repro -f -s <stage>` and SIGKILL DVC and the stage together at a pause point."""
    paused = PausedProcess(["dvc", "repro", "-f", "-s", stage], root, pause_at)
    paused.wait_for_pause()
    os.killpg(paused.process.pid, signal.SIGKILL)
    returncode, _ = paused.finish()
    assert returncode == -signal.SIGKILL


@pytest.mark.integration
@pytest.mark.parametrize("stage, output, pause_at", [
    ("train_gan", "data/gan", "rename data/gan"),
    ("generate", "data/fakes", "rename data/fakes/fakes.npz"),
])
def test_sigkill_leaves_no_output(reproduced_copy, stage, output, pause_at):
    locked = lock_entry(reproduced_copy, stage)

    # The kill lands after the stage finished its temporary output, just before the rename.
    kill_at(reproduced_copy, stage, pause_at)

    # Only a temporary, which .dvcignore hides from DVC, may remain.
    leftovers = [path for path in (reproduced_copy / output).rglob("*") if ".tmp-" not in path.name]
    assert leftovers == []
    assert lock_entry(reproduced_copy, stage) == locked
    status = run(["dvc", "status", stage], reproduced_copy).stdout
    assert re.search(rf"(deleted|modified): +{output}\n", status), status

    run(["dvc", "repro", stage], reproduced_copy)
    assert lock_entry(reproduced_copy, stage) == locked
    assert [path.name for path in (reproduced_copy / output).iterdir() if ".tmp-" not in path.name]


@pytest.mark.integration
def test_sigterm_marks_mlflow_run_killed(reproduced_copy):
    before = {r.info.run_id for r in mlflow_runs(reproduced_copy)}
    # Fewer samples make the metrics, computed before the MLflow run opens, quicker.
    params = yaml.safe_load((reproduced_copy / "params.yaml").read_text())
    params["evaluate"]["num_samples"] = 20
    (reproduced_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    paused = PausedProcess(["python", "-m", "stages.evaluate"], reproduced_copy, "mlflow run open")
    paused.wait_for_pause()
    paused.process.send_signal(signal.SIGTERM)
    returncode, output = paused.finish()

    assert returncode == 130
    assert "stage evaluate interrupted" in output
    assert "Traceback" not in output
    new_runs = [r for r in mlflow_runs(reproduced_copy) if r.info.run_id not in before]
    assert [r.info.status for r in new_runs] == ["KILLED"]
    assert temporaries(reproduced_copy) == []


def test_failed_block_keeps_old_output(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as temporary:
            temporary.write_text("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


def test_orphaned_temporary_removed(tmp_path):
    # A pid above the kernel's maximum (4194304) cannot belong to a live process.
    orphan = tmp_path / ".out.json.tmp-99999999"
    orphan.write_text("left by a killed process")
    with atomic_path(tmp_path / "out.json") as temporary:
        temporary.write_text("new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.json"]
