"""Rejection rules and calibration inside the real pipeline (tiny config)."""

import json
import re

import pandas as pd
import pytest

from tests.conftest import mlflow_runs, run

pytestmark = pytest.mark.integration


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_score_writes_raw_and_calibrated_p(reproduced_repo):
    scores = pd.read_parquet(reproduced_repo / "data" / "scores" / "scores.parquet")
    assert list(scores.columns) == ["sample_id", "logit", "p_raw", "p_calibrated"]
    assert scores["p_raw"].between(0, 1).all()
    assert scores["p_calibrated"].between(0, 1).all()


def test_score_reports_calibration_quality(reproduced_repo):
    metrics = json.loads((reproduced_repo / "metrics" / "score.json").read_text())
    for key in ("brier_raw", "brier_calibrated", "ece_raw", "ece_calibrated"):
        assert 0.0 <= metrics[key] <= 1.0, key


def test_acceptance_curve_covers_thresholds(reproduced_repo):
    curve = pd.read_csv(reproduced_repo / "plots" / "score" / "acceptance_curve.csv")
    assert curve["threshold"].iloc[0] == 0.0
    assert curve["threshold"].iloc[-1] == 1.0
    assert curve["acceptance_rate_calibrated"].is_monotonic_decreasing


def test_run_logs_raw_and_calibrated_rates(reproduced_repo):
    logged = mlflow_runs(reproduced_repo)[0].data.metrics
    assert "acceptance_rate_raw" in logged
    assert "acceptance_rate_calibrated" in logged


def test_kept_set_is_traceable(reproduced_repo):
    decisions = pd.read_parquet(reproduced_repo / "data" / "reject" / "decisions.parquet")
    metrics = json.loads((reproduced_repo / "metrics" / "reject.json").read_text())
    assert int(decisions["accepted"].sum()) == metrics["num_accepted"]
    assert decisions["sample_id"].is_unique


def test_drs_rule_reruns_only_downstream(reproduced_copy):
    result = run(["dvc", "exp", "run", "-S", "reject.rule=drs"], reproduced_copy)
    assert stages_run(result.stdout) == {"reject", "finetune", "evaluate"}
    rule = json.loads((reproduced_copy / "data" / "reject" / "rule.json").read_text())
    assert rule["rule"] == "drs"
    assert {"max_logit", "gamma", "epsilon"} <= set(rule)


def test_unreachable_threshold_fails_with_quantiles(reproduced_copy):
    # p > 1 is impossible, so nothing passes and the error must report the observed p.
    params = (reproduced_copy / "params.yaml").read_text().replace("threshold: 0.0", "threshold: 1.0")
    (reproduced_copy / "params.yaml").write_text(params)
    result = run(["dvc", "repro", "reject"], reproduced_copy, check=False)
    assert result.returncode != 0
    assert "No fake passed threshold=1" in result.stderr + result.stdout
    assert "observed p" in result.stderr + result.stdout
