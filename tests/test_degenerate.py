"""Degenerate inputs: a single-class dataset, data.limit and generate.num_samples below a batch, threshold 0 and 1,
one kept fake, and rejection at inference that keeps too few fakes to evaluate.

Stages run in-process (their `main`) in a workspace without DVC, because that is
cheap enough to cover each case. The last test runs the real evaluate stage.
"""

import contextlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from rsft import data, evaluation, paths
from rsft.checkpoint import load_evaluator, load_gan
from rsft.errors import RsftError
from rsft.params import validate
from tests.conftest import REPO_ROOT, TINY_OVERRIDES, merge, tool_env
from tests.test_data import write_dataset

ONLY_CLASS = 7
CPU = torch.device("cpu")
# data.limit and generate.num_samples are below their stages' batch sizes.
DEGENERATE_OVERRIDES = {
    "data": {"verify_checksum": False, "limit": 40, "validation_size": 60},
    "generate": {"num_samples": 30, "batch_size": 500},
    "score": {"num_calibration": 40},
}


@contextlib.contextmanager
def working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def run_main(root: Path, stage: str, params: dict) -> None:
    with working_directory(root):
        importlib.import_module(f"stages.{stage}").main(params)


def params_for(root: Path, **overrides) -> dict:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params = merge(merge(params, TINY_OVERRIDES), DEGENERATE_OVERRIDES)
    params["data"]["dir"] = str(root / "single-class")
    for dotted, value in overrides.items():
        group, _, key = dotted.rpartition(".")
        (params[group] if group else params)[key] = value
    return validate(params)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Prepared single-class data, a trained evaluator and GAN, and scored fakes."""
    root = tmp_path_factory.mktemp("degenerate")
    write_dataset(root / "single-class", np.full(120, ONLY_CLASS, np.uint8), np.full(60, ONLY_CLASS, np.uint8))
    params = params_for(root)
    assert params["data"]["limit"] < params["train_gan"]["batch_size"]
    assert params["generate"]["num_samples"] < params["generate"]["batch_size"]
    for stage in ("prepare", "train_evaluator", "train_gan", "generate", "score"):
        run_main(root, stage, params)
    return root


def scored_p(root: Path) -> np.ndarray:
    return pd.read_parquet(root / paths.SCORES)["p_calibrated"].to_numpy()


def reject_metrics(root: Path) -> dict:
    return json.loads((root / paths.METRICS_DIR / "reject.json").read_text())


def test_single_class_split(workspace):
    train = data.load_split(workspace / paths.TRAIN_SPLIT)
    assert len(train) == 40
    assert set(train.labels.tolist()) == {ONLY_CLASS}


def test_limit_below_batch_trains_gan(workspace):
    metrics = json.loads((workspace / paths.METRICS_DIR / "train_gan.json").read_text())
    assert metrics["steps"] == TINY_OVERRIDES["train_gan"]["epochs"]
    generator, _, _ = load_gan(workspace / paths.GAN_CHECKPOINT, CPU)
    assert all(torch.isfinite(p).all() for p in generator.parameters())


def test_num_samples_below_batch(workspace):
    with np.load(workspace / paths.FAKES) as fakes:
        assert fakes["images"].shape == (30, 28, 28)


def test_single_class_metrics_finite(workspace):
    evaluator = load_evaluator(workspace / paths.EVALUATOR_CHECKPOINT, CPU)
    test = data.load_split(workspace / paths.TEST_SPLIT)
    with np.load(workspace / paths.FAKES) as fakes:
        images = fakes["images"]
    reference, _ = evaluation.images_to_features(evaluator, test.images, 500, CPU)
    features, labels = evaluation.images_to_features(evaluator, images, 500, CPU)
    metrics = evaluation.features_to_set_metrics(reference, features, labels, seed=0)
    assert np.isfinite(metrics["fid"])
    assert 0.0 <= metrics["coverage"] <= 1.0


def test_threshold_one_keeps_none(workspace):
    with pytest.raises(RsftError) as raised:
        run_main(workspace, "reject", params_for(workspace, threshold=1.0))
    message = str(raised.value)
    assert "No fake passed threshold=1 on calibrated p" in message
    assert "reject.rule=quantile" in message


def test_threshold_zero_keeps_all(workspace):
    assert scored_p(workspace).min() > 0.0
    run_main(workspace, "reject", params_for(workspace, threshold=0.0))
    assert reject_metrics(workspace)["acceptance_rate"] == 1.0


def test_one_kept_fake_finetunes(workspace):
    top = np.sort(scored_p(workspace))[-2:]
    threshold = float((top[0] + top[1]) / 2)
    params = params_for(workspace, threshold=threshold)

    run_main(workspace, "reject", params)
    assert reject_metrics(workspace)["num_accepted"] == 1

    run_main(workspace, "finetune", params)
    finetuned, _, _ = load_gan(workspace / paths.FINETUNE_CHECKPOINT, CPU)
    assert all(torch.isfinite(p).all() for p in finetuned.parameters())


@pytest.mark.integration
def test_too_few_kept_at_inference(reproduced_copy):
    # A rule no fake can pass: rejection at inference keeps nothing.
    rule = reproduced_copy / paths.RULE
    rule.write_text(json.dumps({"rule": "threshold", "threshold": 1.0}))
    params = yaml.safe_load((reproduced_copy / "params.yaml").read_text())
    params["evaluate"]["max_draws_per_sample"] = 1
    (reproduced_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    evaluate_json = (reproduced_copy / "metrics" / "evaluate.json").read_bytes()

    result = subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=reproduced_copy,
                            env=tool_env(reproduced_copy), capture_output=True, text=True, timeout=300)

    assert result.returncode == 1
    assert "error in stage evaluate: rejection at inference kept 0 fakes" in result.stderr
    assert "Raise evaluate.max_draws_per_sample (now 1)" in result.stderr
    assert "Traceback" not in result.stderr
    assert (reproduced_copy / "metrics" / "evaluate.json").read_bytes() == evaluate_json


def test_stage_out_of_order_message(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_for(tmp_path), sort_keys=False))
    env = {**tool_env(tmp_path), "PYTHONPATH": str(REPO_ROOT)}

    result = subprocess.run([sys.executable, "-m", "stages.reject"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)

    assert result.returncode == 1
    assert "error in stage reject: data/scores/scores.parquet not found; run the stages before it" in result.stderr
    assert "Traceback" not in result.stderr
