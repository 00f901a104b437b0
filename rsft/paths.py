"""Artifact paths shared by the stage scripts and dvc.yaml (keep the two in sync)."""

from pathlib import Path

PREPARED_DIR = Path("data/prepared")
TRAIN_SPLIT = PREPARED_DIR / "train.npz"
VALIDATION_SPLIT = PREPARED_DIR / "validation.npz"
TEST_SPLIT = PREPARED_DIR / "test.npz"

EVALUATOR_CHECKPOINT = Path("data/evaluator/evaluator.pt")

GAN_DIR = Path("data/gan")
GAN_CHECKPOINT = GAN_DIR / "checkpoint.pt"
GAN_SAMPLES = GAN_DIR / "samples.png"

FAKES = Path("data/fakes/fakes.npz")

SCORES_DIR = Path("data/scores")
SCORES = SCORES_DIR / "scores.parquet"
CALIBRATOR = SCORES_DIR / "calibrator.json"

REJECT_DIR = Path("data/reject")
KEPT = REJECT_DIR / "kept.npz"
DECISIONS = REJECT_DIR / "decisions.parquet"
RULE = REJECT_DIR / "rule.json"

FINETUNE_CHECKPOINT = Path("data/finetune/checkpoint.pt")

EVALUATE_DIR = Path("data/evaluate")

METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
CONTROL_CHECKPOINT = Path("data/finetune_control/checkpoint.pt")

PARAMS = Path("params.yaml")
LOCK = Path("dvc.lock")
