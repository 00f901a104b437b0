"""Specification of rsft.calibration on logits with a known posterior.

With real logits ~ N(+mu, 1) and fake logits ~ N(-mu, 1) at a 50/50 prior, the true
posterior is P(real | l) = sigmoid(2 * mu * l).
"""

import json

import numpy as np
import pytest
from scipy.special import expit

from rsft.calibration import (
    CALIBRATION_METHODS,
    MIN_SAMPLES_PER_CLASS,
    RELIABILITY_COLUMNS,
    Calibrator,
    IdentityCalibrator,
    brier_score,
    expected_calibration_error,
    fit_calibrator,
    reliability_table,
)

MU = 1.0
NUM_PER_CLASS = 20_000
GRID = np.linspace(-2.0, 2.0, 81)


def gaussian_logits(seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Draw real ~ N(+MU, 1) and fake ~ N(-MU, 1) logits, multiplied by scale."""
    rng = np.random.default_rng(seed)
    real = rng.normal(MU, 1.0, NUM_PER_CLASS)
    fake = rng.normal(-MU, 1.0, NUM_PER_CLASS)
    return scale * real, scale * fake


def true_posterior(logits: np.ndarray, scale: float = 1.0) -> np.ndarray:
    return expit(2.0 * MU * logits / scale)


def labelled(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.concatenate([real, fake])
    labels = np.concatenate([np.ones(real.size), np.zeros(fake.size)])
    return logits, labels


def test_platt_recovers_slope():
    calibrator = fit_calibrator("platt", *gaussian_logits(seed=0))
    assert calibrator.a == pytest.approx(2.0 * MU, abs=0.05)


def test_platt_recovers_zero_intercept():
    calibrator = fit_calibrator("platt", *gaussian_logits(seed=0))
    assert calibrator.b == pytest.approx(0.0, abs=0.05)


def test_platt_matches_posterior():
    calibrator = fit_calibrator("platt", *gaussian_logits(seed=0))
    error = np.abs(calibrator.predict(GRID) - true_posterior(GRID))
    assert error.max() < 0.01


def test_isotonic_close_to_posterior():
    calibrator = fit_calibrator("isotonic", *gaussian_logits(seed=0))
    error = np.abs(calibrator.predict(GRID) - true_posterior(GRID))
    assert error.mean() < 0.02
    assert error.max() < 0.06


def test_isotonic_monotone():
    calibrator = fit_calibrator("isotonic", *gaussian_logits(seed=0))
    assert np.all(np.diff(calibrator.predict(GRID)) >= 0.0)


def test_isotonic_clips_out_of_range():
    calibrator = fit_calibrator("isotonic", *gaussian_logits(seed=0))
    far = calibrator.predict(np.array([-1e6, 1e6]))
    ends = calibrator.predict(np.array([calibrator.x_thresholds[0], calibrator.x_thresholds[-1]]))
    assert np.array_equal(far, ends)


def test_none_is_sigmoid():
    calibrator = fit_calibrator("none", *gaussian_logits(seed=0))
    assert isinstance(calibrator, IdentityCalibrator)
    assert np.array_equal(calibrator.predict(GRID), expit(GRID))


def test_platt_unsquashes_scaled_logits():
    calibrator = fit_calibrator("platt", *gaussian_logits(seed=0, scale=0.1))
    assert calibrator.a == pytest.approx(20.0 * MU, rel=0.03)


def test_platt_squashed_matches_posterior():
    calibrator = fit_calibrator("platt", *gaussian_logits(seed=0, scale=0.1))
    squashed_grid = 0.1 * GRID
    error = np.abs(calibrator.predict(squashed_grid) - true_posterior(squashed_grid, scale=0.1))
    assert error.max() < 0.01


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibrated_ece_below_raw(method):
    calibrator = fit_calibrator(method, *gaussian_logits(seed=0, scale=0.1))
    logits, labels = labelled(*gaussian_logits(seed=1, scale=0.1))

    raw_ece = expected_calibration_error(expit(logits), labels)
    calibrated_ece = expected_calibration_error(calibrator.predict(logits), labels)

    assert raw_ece > 0.1
    assert calibrated_ece < 0.02
    assert calibrated_ece < raw_ece


def test_fit_balances_unequal_classes():
    real, fake = gaussian_logits(seed=0)
    calibrator = fit_calibrator("platt", real[:2_000], fake)
    assert calibrator.b == pytest.approx(0.0, abs=0.1)


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_calibrator_json_round_trip(method):
    calibrator = fit_calibrator(method, *gaussian_logits(seed=0))
    restored = Calibrator.from_dict(json.loads(json.dumps(calibrator.to_dict())))

    assert restored == calibrator
    assert restored.method == method
    assert np.array_equal(restored.predict(GRID), calibrator.predict(GRID))


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_fit_deterministic(method):
    first = fit_calibrator(method, *gaussian_logits(seed=0))
    second = fit_calibrator(method, *gaussian_logits(seed=0))
    assert first.to_dict() == second.to_dict()


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_predict_in_unit_interval(method):
    calibrator = fit_calibrator(method, *gaussian_logits(seed=0))
    p = calibrator.predict(np.array([-1e9, -50.0, 0.0, 50.0, 1e9]))
    assert np.all((p >= 0.0) & (p <= 1.0))


def test_predict_keeps_shape():
    calibrator = fit_calibrator("platt", *gaussian_logits(seed=0))
    assert calibrator.predict(np.zeros((3, 4))).shape == (3, 4)


def test_predict_nan_raises():
    calibrator = fit_calibrator("platt", *gaussian_logits(seed=0))
    with pytest.raises(ValueError, match="NaN"):
        calibrator.predict(np.array([0.0, np.nan]))


def test_platt_separable_finite():
    real = np.arange(10.0) + 5.0
    calibrator = fit_calibrator("platt", real, -real)
    assert np.isfinite(calibrator.a)
    assert calibrator.a > 0.0


def test_fit_invalid_method_lists_allowed():
    with pytest.raises(ValueError, match="'sigmoid'.*none, platt, isotonic"):
        fit_calibrator("sigmoid", *gaussian_logits(seed=0))


def test_fit_too_few_names_counts():
    real, fake = gaussian_logits(seed=0)
    with pytest.raises(ValueError, match=f"got 3 real and {NUM_PER_CLASS} fake.*at least {MIN_SAMPLES_PER_CLASS}"):
        fit_calibrator("platt", real[:3], fake)


def test_fit_empty_class_names_counts():
    real, _ = gaussian_logits(seed=0)
    with pytest.raises(ValueError, match="0 fake"):
        fit_calibrator("isotonic", real, np.array([]))


def test_fit_nan_logit_raises():
    real, fake = gaussian_logits(seed=0)
    real[5] = np.nan
    with pytest.raises(ValueError, match="logits_real"):
        fit_calibrator("platt", real, fake)


def test_from_dict_unknown_method():
    with pytest.raises(ValueError, match="'temperature'"):
        Calibrator.from_dict({"method": "temperature", "t": 2.0})


def test_from_dict_unknown_key():
    with pytest.raises(ValueError, match="'c'"):
        Calibrator.from_dict({"method": "platt", "a": 1.0, "b": 0.0, "c": 3.0})


def test_from_dict_missing_key():
    with pytest.raises(ValueError, match="'b'"):
        Calibrator.from_dict({"method": "platt", "a": 1.0})


def test_brier_perfect_is_zero():
    labels = np.array([0.0, 1.0, 1.0, 0.0])
    assert brier_score(labels, labels) == 0.0


def test_brier_constant_half_is_quarter():
    labels = np.array([0.0, 1.0] * 50)
    assert brier_score(np.full(100, 0.5), labels) == pytest.approx(0.25)


def test_ece_perfect_is_zero():
    labels = np.array([0.0, 1.0, 1.0, 0.0])
    assert expected_calibration_error(labels, labels) == 0.0


def test_ece_constant_half_is_zero():
    labels = np.array([0.0, 1.0] * 50)
    assert expected_calibration_error(np.full(100, 0.5), labels) == pytest.approx(0.0)


def test_ece_overconfident_known_value():
    # Every p is 0.9 but only half are real, so the single bin has a gap of 0.4.
    labels = np.array([0.0, 1.0] * 50)
    assert expected_calibration_error(np.full(100, 0.9), labels) == pytest.approx(0.4)


def test_metrics_length_mismatch_raises():
    with pytest.raises(ValueError, match="3 probabilities and 2 labels"):
        brier_score(np.array([0.1, 0.2, 0.3]), np.array([0.0, 1.0]))


def test_metrics_p_outside_unit_raises():
    with pytest.raises(ValueError, match="1.5"):
        expected_calibration_error(np.array([0.2, 1.5]), np.array([0.0, 1.0]))


def test_metrics_nonbinary_labels_raise():
    with pytest.raises(ValueError, match="labels"):
        brier_score(np.array([0.2, 0.5]), np.array([0.0, 2.0]))


def test_reliability_invalid_bins_raises():
    with pytest.raises(ValueError, match="num_bins 0"):
        reliability_table(np.array([0.2]), np.array([1.0]), num_bins=0)


def test_reliability_columns():
    table = reliability_table(np.array([0.05, 0.5, 0.95]), np.array([0.0, 1.0, 1.0]))
    assert list(table.columns) == list(RELIABILITY_COLUMNS)


def test_reliability_drops_empty_bins():
    table = reliability_table(np.array([0.05, 0.06, 0.95]), np.array([0.0, 1.0, 1.0]), num_bins=10)
    assert table["bin_lower"].tolist() == pytest.approx([0.0, 0.9])
    assert table["count"].tolist() == [2, 1]


def test_reliability_bin_statistics():
    table = reliability_table(np.array([0.05, 0.06, 0.95]), np.array([0.0, 1.0, 1.0]), num_bins=10)
    assert table["mean_predicted"].tolist() == pytest.approx([0.055, 0.95])
    assert table["fraction_real"].tolist() == pytest.approx([0.5, 1.0])


def test_reliability_one_in_last_bin():
    table = reliability_table(np.array([1.0]), np.array([1.0]), num_bins=15)
    assert table["bin_upper"].tolist() == pytest.approx([1.0])


def test_from_dict_not_dict_raises():
    with pytest.raises(ValueError, match="list"):
        Calibrator.from_dict(["platt", 1.0, 0.0])
