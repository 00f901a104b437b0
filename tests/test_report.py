"""The report's run selection and seed summary on constructed run tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rsft import report
from rsft.errors import TrackingError

PARAMS = ["finetune.method", "finetune.seed", "reject.rule", "threshold", "train_gan.epochs"]


def run_row(method: str, seed: int, threshold: float, fid: float, start: int, gan: str = "gan-a") -> dict:
    return {
        "run_id": f"{method}-{seed}-{threshold}-{start}", "run_name": method, "start_time": start,
        "finetune.method": method, "finetune.seed": float(seed), "reject.rule": "threshold",
        "threshold": threshold, "train_gan.epochs": 10.0, "acceptance_rate": 1.0 - threshold,
        "fid_finetuned": fid, "fid_control": 100.0 + seed, "fid_gain_vs_control": (100.0 + seed - fid) / (100.0 + seed),
        "precision_finetuned": 0.7, "recall_finetuned": 0.6, report.GAN_TAG: gan,
    }


@pytest.fixture
def runs() -> pd.DataFrame:
    rows = [run_row(method, seed, threshold, fid=90.0 + seed + 10 * threshold + (5 if method == "mixed" else 0),
                    start=seed)
            for method in ("topk", "mixed") for threshold in (0.3, 0.5) for seed in (0, 1, 2)]
    return pd.DataFrame(rows)


def test_varying_params_leading_first(runs):
    assert report.varying_params(runs, PARAMS) == ["finetune.method", "threshold", "finetune.seed"]


def test_select_keeps_newest_run_of_setting(runs):
    repeated = run_row("topk", 0, 0.3, fid=50.0, start=99)
    selected = report.select_comparable(pd.concat([runs, pd.DataFrame([repeated])]), PARAMS)
    same = selected[(selected["finetune.method"] == "topk") & (selected["threshold"] == 0.3)
                    & (selected["finetune.seed"] == 0)]
    assert len(selected) == len(runs)
    assert same["fid_finetuned"].tolist() == [50.0]


def test_select_keeps_seeds_apart(runs):
    assert len(report.select_comparable(runs, PARAMS)) == 12


def test_select_drops_other_gan(runs):
    other = run_row("topk", 5, 0.3, fid=10.0, start=-1, gan="gan-b")
    selected = report.select_comparable(pd.concat([runs, pd.DataFrame([other])]), PARAMS)
    assert "gan-b" not in set(selected[report.GAN_TAG])


def test_summary_one_row_per_setting(runs):
    summary = report.summarize_seeds(runs, PARAMS)
    assert summary[["finetune.method", "threshold"]].values.tolist() == [
        ["mixed", 0.3], ["mixed", 0.5], ["topk", 0.3], ["topk", 0.5]]
    assert summary["num_seeds"].tolist() == [3, 3, 3, 3]
    assert summary["seeds"].tolist() == ["0 1 2"] * 4


def test_summary_mean_and_sample_sd(runs):
    summary = report.summarize_seeds(runs, PARAMS)
    row = summary[(summary["finetune.method"] == "topk") & (summary["threshold"] == 0.5)].iloc[0]
    assert row["fid_finetuned_mean"] == pytest.approx(96.0)
    assert row["fid_finetuned_sd"] == pytest.approx(1.0)
    gains = [(100.0 + seed - (95.0 + seed)) / (100.0 + seed) for seed in (0, 1, 2)]
    assert row["fid_gain_vs_control_mean"] == pytest.approx(np.mean(gains))
    assert row["fid_gain_vs_control_sd"] == pytest.approx(np.std(gains, ddof=1))


def test_summary_single_seed_has_no_sd(runs):
    summary = report.summarize_seeds(runs[runs["finetune.seed"] == 0], PARAMS)
    assert summary["num_seeds"].tolist() == [1, 1, 1, 1]
    assert summary["fid_finetuned_sd"].isna().all()


def test_summary_without_varied_params(runs):
    one_setting = runs[(runs["finetune.method"] == "topk") & (runs["threshold"] == 0.3)]
    summary = report.summarize_seeds(one_setting, PARAMS)
    assert len(summary) == 1
    assert summary["fid_finetuned_mean"].iloc[0] == pytest.approx(94.0)


def test_seeds_markdown_cells(runs):
    text = report.seeds_to_markdown(report.summarize_seeds(runs, PARAMS))
    header, _, first, *_ = text.splitlines()
    assert header.startswith("| finetune.method | threshold | num_seeds | acceptance_rate | fid_finetuned |")
    assert "| 0.7 ± 0 | 99 ± 1 |" in first


def test_table_columns_include_seed(runs):
    columns = report.table_columns(runs, PARAMS)
    assert columns[:5] == ["run_name", "reject.rule", "finetune.method", "threshold", "finetune.seed"]
    assert "train_gan.epochs" not in columns


def test_figure_has_one_line_per_method(runs):
    figure = report.tradeoff_figure(report.select_comparable(runs, PARAMS), PARAMS)
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert [label for label in labels if label.startswith("RSFT")] == ["RSFT (method=mixed)", "RSFT (method=topk)"]


def test_frame_mixed_param_types_as_text():
    class Run:
        def __init__(self, run_id: str, value: str):
            self.info = type("Info", (), {"run_id": run_id, "run_name": run_id, "start_time": 0})()
            self.data = type("Data", (), {"params": {"tracking.experiment": value}, "metrics": {}, "tags": {}})()

    frame, params = report.runs_to_frame([Run("a", "1"), Run("b", "rsft")])
    assert params == ["tracking.experiment"]
    assert frame["tracking.experiment"].tolist() == ["1.0", "rsft"]
    assert len(report.select_comparable(frame.assign(start_time=[1, 2]), params)) == 2


@pytest.mark.parametrize(("content", "state"), [(b"", "is empty"), (b"not a database\n", "is not an SQLite database")])
def test_report_rejects_non_store(tmp_path, monkeypatch, content, state):
    database = tmp_path / "mlflow.db"
    database.write_bytes(content)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    with pytest.raises(TrackingError) as raised:
        report.write_report("rsft", tmp_path / "out", link=False)
    assert f"{database} {state}" in str(raised.value)
    assert database.read_bytes() == content
    assert not (tmp_path / "out").exists()


def test_report_names_missing_experiment(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("rsft", artifact_location=(tmp_path / "art").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError) as raised:
        report.write_report("rsfy", tmp_path / "out", link=False)
    assert "no experiment named 'rsfy'" in str(raised.value)
    assert "found: Default, rsft" in str(raised.value)
