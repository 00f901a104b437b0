"""Fine-tuning methods, the equal-compute control, rounds and the diversity guard.

Unit tests train tiny real models for a few steps in-process. Integration
tests run the real DVC on the tiny repository and read the real MLflow store.
"""

import json
import re

import numpy as np
import pytest
import torch
import yaml
from torch.nn import functional as F

from rsft.calibration import PlattCalibrator
from rsft.checkpoint import gan_state
from rsft.errors import RsftError
from rsft.finetuning import (
    CONTROL, MAX_ROUND_THRESHOLD, RoundInput, diversity_drops, fake_weights_for, finetune_rounds, round_checkpoints,
    round_threshold, select_round_input, select_top_fraction, update_count,
)
from rsft.models import Discriminator, Generator
from rsft.params import FINETUNE_METHODS
from rsft.training import make_adam, weighted_generator_loss
from tests.conftest import mlflow_runs, run

STEPS = 3
BATCH_SIZE = 8


def tiny_params(**finetune) -> dict:
    return {
        "threshold": 0.5,
        "train_gan": {"log_every": 2},
        "generate": {"num_samples": 64, "batch_size": 32},
        "score": {"calibration": "platt", "num_calibration": 40},
        "reject": {"rule": "quantile", "keep_fraction": 0.5, "drs_gamma_percentile": 80.0, "drs_epsilon": 1e-6},
        "finetune": {"method": "mixed", "real_fraction": 0.5, "steps": STEPS, "batch_size": BATCH_SIZE, "lr": 2e-4,
                     "seed": 0, "rounds": 1, "threshold_step": 0.0, **finetune},
    }


def fresh_gan(seed: int = 0) -> tuple[Generator, Discriminator, dict]:
    torch.manual_seed(seed)
    generator, discriminator = Generator(8, 4), Discriminator(4)
    config = {"latent_dim": 8, "base_channels": 4, "spectral_norm": False}
    state = gan_state(generator, discriminator, make_adam(generator, 2e-4), make_adam(discriminator, 2e-4), config, 0)
    return generator, discriminator, state


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)


FIRST_ROUND = RoundInput(images(24, 1), acceptance_rate=0.5, calibrator=PlattCalibrator(a=1.0, b=0.0), num_scored=48)


def run_rounds(method: str, tmp_path, seed: int = 0, **finetune) -> tuple[Generator, list[dict], dict]:
    generator, discriminator, state = fresh_gan(seed)
    output = tmp_path / method
    output.mkdir()
    rows, _ = finetune_rounds(
        tiny_params(**finetune), method, state, (generator, discriminator), images(40, 2), images(40, 3),
        None if method == CONTROL else FIRST_ROUND, output, torch.device("cpu"),
    )
    final = torch.load(output / "checkpoint.pt", weights_only=True)
    return generator, rows, final


@pytest.fixture(scope="module")
def two_round_runs(tmp_path_factory) -> dict:
    """Generator and final checkpoint state after two rounds of every method and the control."""
    runs = {}
    for method in (*FINETUNE_METHODS, CONTROL):
        generator, _, state = run_rounds(method, tmp_path_factory.mktemp(method), rounds=2)
        runs[method] = (generator, state)
    return runs


@pytest.mark.parametrize("method", FINETUNE_METHODS)
def test_method_changes_generator(method, two_round_runs):
    initial, _, _ = fresh_gan()
    tuned, _ = two_round_runs[method]
    changed = [not torch.equal(a, b) for a, b in zip(initial.state_dict().values(), tuned.state_dict().values())]
    assert any(changed)


def test_control_counts_rounds_times_steps(two_round_runs):
    _, control_state = two_round_runs[CONTROL]
    for optimizer in ("optimizer_g", "optimizer_d"):
        assert update_count(control_state, optimizer) == 2 * STEPS, optimizer


@pytest.mark.parametrize("method", FINETUNE_METHODS)
def test_method_counts_same_updates_as_control(method, two_round_runs):
    _, method_state = two_round_runs[method]
    _, control_state = two_round_runs[CONTROL]
    for optimizer in ("optimizer_g", "optimizer_d"):
        assert update_count(method_state, optimizer) == update_count(control_state, optimizer), optimizer


def test_topk_keeping_all_equals_control(tmp_path):
    # With every fake passing, topk is the control: same batches, latents and loss.
    generator_topk, _, _ = run_rounds_with_rate(tmp_path, 1.0)
    generator_control, _, _ = run_rounds(CONTROL, tmp_path)
    for a, b in zip(generator_topk.state_dict().values(), generator_control.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def run_rounds_with_rate(tmp_path, acceptance_rate: float):
    generator, discriminator, state = fresh_gan()
    output = tmp_path / "topk_rate"
    output.mkdir()
    first = RoundInput(FIRST_ROUND.kept_images, acceptance_rate, FIRST_ROUND.calibrator, num_scored=48)
    rows, _ = finetune_rounds(tiny_params(), "topk", state, (generator, discriminator), images(40, 2),
                              images(40, 3), first, output, torch.device("cpu"))
    return generator, rows, output


def test_topk_selects_passing_fakes():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0, 1.0, -2.0])
    mask = select_top_fraction(logits, 0.5)
    assert mask.tolist() == [False, True, False, True, True, False]


def test_topk_selects_at_least_one():
    assert int(select_top_fraction(torch.tensor([0.1, 0.2, 0.3]), 0.01).sum()) == 1


def test_topk_loss_only_on_passing_fakes():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0], requires_grad=True)
    weights = fake_weights_for("topk", 0.5, PlattCalibrator(a=1.0, b=0.0))(logits.detach())
    loss = weighted_generator_loss(logits, weights)
    loss.backward()

    expected = F.binary_cross_entropy_with_logits(torch.tensor([3.0, 2.0]), torch.ones(2))
    assert loss.item() == pytest.approx(expected.item())
    assert logits.grad[0] == 0.0
    assert logits.grad[2] == 0.0
    assert logits.grad[1] != 0.0
    assert logits.grad[3] != 0.0


def test_weighted_uses_calibrated_p():
    calibrator = PlattCalibrator(a=2.0, b=-1.0)
    logits = torch.tensor([-1.0, 0.0, 2.0])
    weights = fake_weights_for("weighted", 0.5, calibrator)(logits)
    assert weights.tolist() == pytest.approx(calibrator.predict(logits.double().numpy()).tolist())


def test_method_without_kept_fakes_fails(tmp_path):
    generator, discriminator, state = fresh_gan()
    with pytest.raises(RsftError, match="kept fakes"):
        finetune_rounds(tiny_params(), "mixed", state, (generator, discriminator), images(40, 2), images(40, 3),
                        None, tmp_path, torch.device("cpu"))


def test_rounds_write_every_round(tmp_path):
    _, rows, _ = run_rounds("mixed", tmp_path, rounds=3)
    output = tmp_path / "mixed"
    assert [index for index, _ in round_checkpoints(output)] == [1, 2, 3]
    assert not (output / "round_1" / "kept.npz").exists()
    for index in (2, 3):
        with np.load(output / f"round_{index}" / "kept.npz") as kept:
            assert len(kept["images"]) == 32, index
        assert json.loads((output / f"round_{index}" / "rule.json").read_text())["rule"] == "quantile"
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert [row["generator_updates"] for row in rows] == [STEPS, 2 * STEPS, 3 * STEPS]


def test_round_threshold_rises_and_caps():
    assert round_threshold(0.8, 1, 0.05) == 0.8
    assert round_threshold(0.8, 3, 0.05) == pytest.approx(0.9)
    assert round_threshold(0.8, 10, 0.05) == MAX_ROUND_THRESHOLD
    assert round_threshold(0.995, 2, 0.05) == 0.995


def test_diversity_drops_flags_recall_and_coverage():
    results = {"recall_baseline": 0.50, "recall_finetuned": 0.40, "coverage_baseline": 0.60,
               "coverage_finetuned": 0.58}
    messages = diversity_drops(results, 0.05)
    assert len(messages) == 1
    assert messages[0].startswith("recall")
    assert diversity_drops(results, 0.2) == []


# Integration: the real DVC pipeline and MLflow store of the tiny repository.

def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.integration
def test_reproduced_control_matches_updates(reproduced_repo):
    def count(stage: str) -> int:
        return update_count(torch.load(reproduced_repo / "data" / stage / "checkpoint.pt", weights_only=True))

    metrics = json.loads((reproduced_repo / "metrics" / "finetune.json").read_text())
    assert count("finetune") == count("gan") + metrics["steps"]
    assert count("finetune_control") == count("finetune")


@pytest.mark.integration
def test_diversity_tag_matches_metrics(reproduced_repo):
    evaluate = json.loads((reproduced_repo / "metrics" / "evaluate.json").read_text())
    expected = "true" if diversity_drops(evaluate, 0.05) else "false"
    assert mlflow_runs(reproduced_repo)[0].data.tags["diversity_warning"] == expected


@pytest.mark.integration
def test_method_change_reruns_only_finetune(reproduced_copy):
    # A dry run lists the stages whose own dependencies changed. Evaluate reads
    # finetune.method for the MLflow run name, so it is listed too.
    params_path = reproduced_copy / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["finetune"]["method"] = next(m for m in FINETUNE_METHODS if m != params["finetune"]["method"])
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(["dvc", "repro", "--dry"], reproduced_copy)
    assert stages_run(result.stdout) == {"finetune", "evaluate"}


@pytest.mark.integration
def test_rounds_log_metrics_per_round(reproduced_copy):
    result = run(["dvc", "exp", "run", "-S", "finetune.rounds=2"], reproduced_copy)
    assert stages_run(result.stdout) == {"finetune", "finetune_control", "evaluate"}
    assert (reproduced_copy / "data" / "finetune" / "round_2" / "kept.npz").is_file()

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{reproduced_copy / 'mlflow.db'}")
    newest = max(mlflow_runs(reproduced_copy), key=lambda r: r.info.start_time)
    for key in ("rounds.fid_finetuned", "rounds.recall_finetuned", "rounds.coverage_finetuned", "rounds.fid_control"):
        steps = sorted(metric.step for metric in client.get_metric_history(newest.info.run_id, key))
        assert steps == [0, 1, 2], key
    steps = sorted(metric.step for metric in client.get_metric_history(newest.info.run_id, "rounds.acceptance_rate"))
    assert steps == [1, 2]


def round_two_params(method: str) -> dict:
    # Threshold 0 rising by 0.99 gives round 2 the capped threshold 0.99, which no fake of an untrained GAN passes.
    params = tiny_params(method=method, rounds=2, threshold_step=0.99)
    params["threshold"] = 0.0
    params["reject"]["rule"] = "threshold"
    return params


def test_round_without_kept_fakes_suggests_step():
    generator, discriminator, _ = fresh_gan()
    with pytest.raises(RsftError) as raised:
        select_round_input(generator, discriminator, images(40, 3), round_two_params("mixed"), "mixed", 2,
                           torch.device("cpu"))
    message = str(raised.value)
    assert "round 2: no fake passed threshold=0.99" in message
    assert "dvc exp run -S finetune.threshold_step=0." in message


def test_round_without_kept_fakes_weighted_continues():
    generator, discriminator, _ = fresh_gan()
    round_input, artifacts = select_round_input(
        generator, discriminator, images(40, 3), round_two_params("weighted"), "weighted", 2, torch.device("cpu")
    )
    assert round_input.acceptance_rate == 0.0
    assert len(artifacts["images"]) == 0
