"""End-to-end: the real `dvc repro` and `dvc exp run` on a tiny config, read back from the real MLflow store."""

import json
import re

import pytest
import yaml

from tests.conftest import median_threshold, mlflow_runs, run

pytestmark = pytest.mark.integration

STAGES = ("prepare", "train_evaluator", "train_gan", "generate", "score", "reject", "finetune",
          "finetune_control", "evaluate")
FIDS = ("fid_real", "fid_baseline", "fid_rejection", "fid_finetuned", "fid_control")


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_repro_locks_every_stage(reproduced_repo):
    lock = yaml.safe_load((reproduced_repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)


def test_repro_writes_all_fids(reproduced_repo):
    metrics = json.loads((reproduced_repo / "metrics" / "evaluate.json").read_text())
    for key in FIDS:
        assert metrics[key] >= 0.0, key


def test_repro_logs_one_finished_run(reproduced_repo):
    runs = mlflow_runs(reproduced_repo)
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"


def test_run_records_threshold_and_metrics(reproduced_repo):
    logged = mlflow_runs(reproduced_repo)[0].data
    reject = json.loads((reproduced_repo / "metrics" / "reject.json").read_text())
    evaluate = json.loads((reproduced_repo / "metrics" / "evaluate.json").read_text())
    assert logged.params["threshold"] == "0.0"
    assert logged.metrics["acceptance_rate"] == pytest.approx(reject["acceptance_rate"])
    for key in FIDS:
        assert logged.metrics[key] == pytest.approx(evaluate[key]), key


def test_run_tags_lineage(reproduced_repo):
    tags = mlflow_runs(reproduced_repo)[0].data.tags
    head = run(["git", "rev-parse", "HEAD"], reproduced_repo).stdout.strip()
    lock = yaml.safe_load((reproduced_repo / "dvc.lock").read_text())
    gan_md5 = next(out["md5"] for out in lock["stages"]["train_gan"]["outs"] if out["path"] == "data/gan")
    assert tags["git_commit"] == head
    assert tags["dvc.md5.data/gan"] == gan_md5


def test_threshold_change_reruns_only_downstream(reproduced_copy):
    threshold = median_threshold(reproduced_copy)
    result = run(["dvc", "exp", "run", "-S", f"threshold={threshold}"], reproduced_copy)
    assert stages_run(result.stdout) == {"reject", "finetune", "evaluate"}

    runs = mlflow_runs(reproduced_copy)
    thresholds = sorted(float(r.data.params["threshold"]) for r in runs)
    assert thresholds == [0.0, float(threshold)]
    newest = max(runs, key=lambda r: r.info.start_time)
    assert newest.data.tags["dvc_exp_name"]
