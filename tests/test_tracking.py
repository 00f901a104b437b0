"""MLflow tracking: lineage tags, stage costs, store errors and run status, against a real SQLite store."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from rsft import tracking
from rsft.errors import TrackingError
from rsft.params import validate
from tests.conftest import REPO_ROOT, mlflow_runs, tool_env

LOCK = {
    "schema": "2.0",
    "stages": {
        "prepare": {"outs": [{"path": "data/prepared", "md5": "a" * 32 + ".dir"}],
                    "deps": [{"path": "/data/fashion-mnist", "md5": "b" * 32 + ".dir"}]},
        "evaluate": {"outs": [{"path": "metrics/evaluate.json", "md5": "c" * 32}]},
    },
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty repository root whose SQLite MLflow store is created once for the module."""
    root = tmp_path_factory.mktemp("store")
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / tracking.DATABASE_NAME}").search_experiments()
    return root


@pytest.fixture
def in_store(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a fresh workspace whose runs go to the module's store, as a queued DVC experiment does."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(store))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    return store


def default_params(threshold: object = 0.8) -> dict:
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["threshold"] = threshold
    return validate(raw)


def write_cost(folder: Path, stage: str, wall_time_s: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "wall_time_s": wall_time_s, "peak_memory_mb": 100.0, "device": "cpu"}
    (folder / f"{stage}.json").write_text(json.dumps(record))


def test_lock_hashes_skip_running_stage(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump(LOCK))
    hashes = tracking.lock_hashes(lock, exclude_stages=("evaluate",))
    assert hashes["dvc.md5.data/prepared"] == "a" * 32 + ".dir"
    assert hashes["dvc.md5./data/fashion-mnist"] == "b" * 32 + ".dir"
    assert "dvc.md5.metrics/evaluate.json" not in hashes


def test_lock_hashes_sanitize_tag_keys(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"stages": {"prepare": {"deps": [{"path": "~/data:v1", "md5": "d" * 32}]}}}))
    assert tracking.lock_hashes(lock) == {"dvc.md5._/data_v1": "d" * 32}


def test_format_param_int_and_float_threshold():
    assert tracking.format_param(default_params(1)["threshold"]) == "1.0"
    assert tracking.format_param(default_params(1.0)["threshold"]) == "1.0"
    assert tracking.format_param(True) == "true"


def test_overhead_is_rsft_time_over_training():
    costs = {stage: {"wall_time_s": seconds} for stage, seconds in
             (("train_gan", 100.0), ("generate", 5.0), ("score", 10.0), ("reject", 1.0), ("finetune", 24.0))}
    assert tracking.rsft_overhead(costs) == pytest.approx(0.4)
    del costs["score"]
    assert tracking.rsft_overhead(costs) is None


def test_costs_fall_back_to_repository_root(in_store, tmp_path):
    write_cost(in_store / "costs", "train_gan", 50.0)
    write_cost(tmp_path / "costs", "train_gan", 7.0)
    write_cost(in_store / "costs", "generate", 2.0)
    costs = tracking.read_stage_costs(("train_gan", "generate", "score"))
    assert costs["train_gan"]["wall_time_s"] == 7.0
    assert costs["train_gan"]["source"] == "workspace"
    assert costs["generate"]["source"] == "repository root"
    assert "score" not in costs


def test_log_run_records_lineage_and_dataset(in_store, tmp_path):
    dataset = tracking.prepared_dataset(Path("data/prepared"), tmp_path / "dvc.lock")
    tags = tracking.lineage_tags("cpu")
    run_id = tracking.log_run("unit", default_params(), {"fid_finetuned": 3.5}, tags, [Path("dvc.lock")],
                              step_metrics={"train_gan.loss_d": [(0, 1.0), (10, 0.5)]}, run_name="unit run",
                              datasets=[dataset])
    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(in_store))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dvc.md5.data/prepared"] == "a" * 32 + ".dir"
    assert "dvc.md5.metrics/evaluate.json" not in run.data.tags
    assert run.data.tags["version.mlflow"] == mlflow.__version__
    assert run.data.params["threshold"] == "0.8"
    assert [m.value for m in client.get_metric_history(run_id, "train_gan.loss_d")] == [1.0, 0.5]
    assert run.inputs.dataset_inputs[0].dataset.digest == "a" * 32
    assert [f.path for f in client.list_artifacts(run_id)] == ["dvc.lock"]


def test_log_run_int_then_float_threshold(in_store):
    first = tracking.log_run("unit", default_params(1), {}, {}, [], run_name="int")
    second = tracking.log_run("unit", default_params(1.0), {}, {}, [], run_name="float")
    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(in_store))
    assert client.get_run(first).data.params["threshold"] == client.get_run(second).data.params["threshold"]


def test_log_run_failure_ends_failed(in_store):
    with pytest.raises(TrackingError, match="writing MLflow run"):
        tracking.log_run("failing", default_params(), {"invalid key!": 1.0}, {}, [])
    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(in_store))
    runs = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]


def test_store_lock_timeout_names_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "LOCK_TIMEOUT_S", 0.5)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with open(tmp_path / "mlflow.db.lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(TrackingError, match="mlflow.db.lock"):
            with tracking.store_lock(uri):
                pass


def test_unwritable_store_raises_tracking_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker / 'mlflow.db'}")
    with pytest.raises(TrackingError, match="cannot open the MLflow store lock"):
        tracking.log_run("unit", default_params(), {}, {}, [])


def test_experiment_commits_parse_dvc_refs(tmp_path):
    env = tool_env(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "base"], cwd=tmp_path, check=True, env=env)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.strip()
    subprocess.run(["git", "update-ref", f"refs/exps/{head[:2]}/{head[2:]}/lucid-fox", head], cwd=tmp_path,
                   check=True)
    subprocess.run(["git", "update-ref", "refs/exps/celery/stash", head], cwd=tmp_path, check=True)
    assert tracking.experiment_commits(tmp_path) == {(head, "lucid-fox"): head}


@pytest.mark.integration
def test_run_carries_costs_and_dataset(reproduced_repo):
    run = mlflow_runs(reproduced_repo)[0]
    lock = yaml.safe_load((reproduced_repo / "dvc.lock").read_text())
    prepared = next(out["md5"] for out in lock["stages"]["prepare"]["outs"] if out["path"] == "data/prepared")
    for stage in ("train_gan", "generate", "score", "reject", "finetune", "evaluate"):
        assert run.data.metrics[f"cost.{stage}.wall_time_s"] > 0, stage
    assert run.data.metrics["rsft_overhead"] > 0
    assert run.data.tags["cost.train_gan.device"] == "cpu"
    assert run.inputs.dataset_inputs[0].dataset.digest == prepared.removesuffix(".dir")


@pytest.mark.integration
def test_costs_shown_but_not_locked(reproduced_repo):
    costs = json.loads((reproduced_repo / "metrics" / "costs.json").read_text())
    lock_text = (reproduced_repo / "dvc.lock").read_text()
    assert costs["rsft_overhead"] > 0
    assert costs["train_gan"]["wall_time_s"] > 0
    assert "metrics/costs.json" not in lock_text


@pytest.mark.integration
def test_run_has_loss_curves(reproduced_repo):
    run = mlflow_runs(reproduced_repo)[0]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{reproduced_repo / 'mlflow.db'}")
    losses = (reproduced_repo / "plots" / "train_gan" / "losses.csv").read_text().splitlines()
    history = client.get_metric_history(run.info.run_id, "train_gan.loss_g")
    assert len(history) == len(losses) - 1
    assert client.get_metric_history(run.info.run_id, "finetune.loss_d")


@pytest.mark.integration
def test_evaluate_unwritable_store_fails_cleanly(reproduced_copy):
    blocker = reproduced_copy / "not-a-directory"
    blocker.write_text("")
    env = {**tool_env(reproduced_copy), "MLFLOW_TRACKING_URI": f"sqlite:///{blocker / 'mlflow.db'}"}
    (reproduced_copy / "metrics" / "evaluate.json").unlink()
    result = subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=reproduced_copy, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "error in stage evaluate: cannot open the MLflow store lock" in result.stderr
    assert "Traceback" not in result.stderr
    assert (reproduced_copy / "metrics" / "evaluate.json").is_file()


def test_report_keeps_newest_run_per_setting():
    import pandas as pd

    from rsft.report import GAN_TAG, select_comparable

    frame = pd.DataFrame([
        {"run_id": "old", "start_time": 1, "reject.rule": "threshold", "finetune.method": "mixed", "threshold": 0.5,
         GAN_TAG: "gan-a"},
        {"run_id": "other-gan", "start_time": 2, "reject.rule": "threshold", "finetune.method": "mixed",
         "threshold": 0.7, GAN_TAG: "gan-b"},
        {"run_id": "new", "start_time": 3, "reject.rule": "threshold", "finetune.method": "mixed", "threshold": 0.5,
         GAN_TAG: "gan-a"},
        {"run_id": "high", "start_time": 4, "reject.rule": "threshold", "finetune.method": "mixed", "threshold": 0.9,
         GAN_TAG: "gan-a"},
    ])
    assert list(select_comparable(frame, ["reject.rule", "finetune.method", "threshold"])["run_id"]) == ["new", "high"]


@pytest.mark.parametrize(("line", "expected"), [
    (" M dvc.lock", True),
    (" M params.yaml", True),
    (" M metrics/costs.json", True),
    ("M  plots/finetune/losses.csv", True),
    (" M rsft/finetuning.py", False),
    (" M stages/finetune.py", False),
    ("R  metrics/a.json -> rsft/a.py", False),
    (" M metricsx.py", False),
])
def test_pipeline_written_status_lines(line, expected):
    from rsft.tracking import is_pipeline_written

    assert is_pipeline_written(line) is expected


def test_git_dirty_ignores_pipeline_outputs(tmp_path):
    from rsft.tracking import git_commit

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "metrics").mkdir()
    for name in ("params.yaml", "metrics/costs.json", "code.py"):
        (tmp_path / name).write_text("a\n")
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "x"],
                   cwd=tmp_path, check=True)

    (tmp_path / "metrics" / "costs.json").write_text("b\n")
    (tmp_path / "params.yaml").write_text("b\n")
    assert git_commit(tmp_path)[1] is False

    (tmp_path / "code.py").write_text("b\n")
    assert git_commit(tmp_path)[1] is True
