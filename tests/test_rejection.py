"""Specification of the rejection rules in rsft.rejection."""

import logging

import numpy as np
import pytest

from rsft.errors import RsftError
from rsft.rejection import (
    P_QUANTILE_PERCENTILES,
    REJECTION_RULES,
    NoFakesAcceptedError,
    accept_drs,
    accept_quantile,
    accept_threshold,
    acceptance_curve,
    check_accepted,
    p_quantiles,
    suggest_threshold,
)


def uniform_p(seed: int = 0, size: int = 1_000, low: float = 0.12, high: float = 0.86) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, size)


def normal_logits(seed: int = 0, size: int = 10_000) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, size)


def test_rules_constant():
    assert REJECTION_RULES == ("threshold", "quantile", "drs")


def test_threshold_keeps_strictly_above():
    p = np.array([0.2, 0.7, 0.71, 0.9])
    assert accept_threshold(p, 0.7).tolist() == [False, False, True, True]


def test_threshold_rate_matches_definition():
    p = uniform_p()
    assert accept_threshold(p, 0.5).mean() == np.mean(p > 0.5)


def test_threshold_zero_rejects_only_zero():
    p = np.array([0.0, 1e-12, 0.5, 1.0])
    assert accept_threshold(p, 0.0).tolist() == [False, True, True, True]


def test_threshold_one_rejects_all():
    p = np.array([0.0, 0.5, 1.0])
    assert not accept_threshold(p, 1.0).any()


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_threshold_out_of_range_raises(threshold):
    with pytest.raises(ValueError, match=f"threshold {threshold!r}"):
        accept_threshold(uniform_p(), threshold)


def test_threshold_p_outside_unit_raises():
    with pytest.raises(ValueError, match="3.5"):
        accept_threshold(np.array([0.2, 3.5]), 0.5)


def test_threshold_empty_raises():
    with pytest.raises(ValueError, match="empty"):
        accept_threshold(np.array([]), 0.5)


@pytest.mark.parametrize(
    ("keep_fraction", "size", "expected"),
    [
        (0.5, 10, 5),
        (0.25, 10, 3),
        (0.1, 30, 3),
        (1.0, 7, 7),
        (1e-9, 1_000, 1),
        (0.001, 10, 1),
    ],
)
def test_quantile_exact_count(keep_fraction, size, expected):
    scores = np.random.default_rng(0).normal(size=size)
    assert accept_quantile(scores, keep_fraction).sum() == expected


def test_quantile_keeps_top_scores():
    scores = np.array([0.3, 0.9, 0.1, 0.8, 0.5])
    assert accept_quantile(scores, 0.4).tolist() == [False, True, False, True, False]


def test_quantile_ties_prefer_lower_index():
    scores = np.array([0.5, 0.9, 0.5, 0.5, 0.1])
    assert accept_quantile(scores, 0.6).tolist() == [True, True, True, False, False]


def test_quantile_all_tied():
    assert accept_quantile(np.zeros(6), 0.5).tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize("keep_fraction", [0.0, -0.5, 1.01, float("nan")])
def test_quantile_invalid_fraction_raises(keep_fraction):
    with pytest.raises(ValueError, match=f"keep_fraction {keep_fraction!r}"):
        accept_quantile(uniform_p(), keep_fraction)


def test_quantile_nan_score_raises():
    with pytest.raises(ValueError, match="NaN"):
        accept_quantile(np.array([0.1, np.nan]), 0.5)


def test_drs_gamma_min_half_probability():
    _, acceptance_probability = accept_drs(normal_logits(), gamma_percentile=0.0)
    assert acceptance_probability.min() == pytest.approx(0.5)


def test_drs_gamma_min_keeps_most():
    mask, _ = accept_drs(normal_logits(), gamma_percentile=0.0)
    assert mask.mean() > 0.9


def test_drs_gamma_99_keeps_few():
    mask, _ = accept_drs(normal_logits(), gamma_percentile=99.0)
    assert mask.mean() < 0.2


def test_drs_rate_decreases_with_gamma():
    rates = [accept_drs(normal_logits(), gamma_percentile=q)[0].mean() for q in (0.0, 50.0, 80.0, 99.0)]
    assert rates == sorted(rates, reverse=True)


def test_drs_probability_increases_with_logit():
    logits = np.sort(normal_logits())
    _, acceptance_probability = accept_drs(logits, gamma_percentile=50.0)
    assert np.all(np.diff(acceptance_probability) >= 0.0)


def test_drs_matches_formula():
    logits = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    epsilon = 1e-3
    f_values = logits - 2.0 - np.log(1.0 - np.exp(logits - 2.0 - epsilon))
    gamma = np.percentile(f_values, 50.0)
    expected = 1.0 / (1.0 + np.exp(-(f_values - gamma)))

    _, acceptance_probability = accept_drs(logits, gamma_percentile=50.0, epsilon=epsilon)

    assert acceptance_probability == pytest.approx(expected, rel=1e-12)


def test_drs_finite_at_max_logit():
    logits = np.array([-1e3, 0.0, 40.0, 40.0])
    _, acceptance_probability = accept_drs(logits, gamma_percentile=50.0, epsilon=1e-12)
    assert np.all(np.isfinite(acceptance_probability))


def test_drs_same_seed_same_mask():
    first, _ = accept_drs(normal_logits(), gamma_percentile=80.0, seed=3)
    second, _ = accept_drs(normal_logits(), gamma_percentile=80.0, seed=3)
    assert np.array_equal(first, second)


def test_drs_other_seed_other_mask():
    first, _ = accept_drs(normal_logits(), gamma_percentile=80.0, seed=3)
    second, _ = accept_drs(normal_logits(), gamma_percentile=80.0, seed=4)
    assert not np.array_equal(first, second)


def test_drs_max_logit_used():
    logits = normal_logits()
    _, default = accept_drs(logits, gamma_percentile=80.0)
    _, with_max = accept_drs(logits, gamma_percentile=80.0, max_logit=float(logits.max()) + 0.01)
    assert not np.array_equal(default, with_max)


def test_drs_low_max_logit_uses_data_max():
    logits = normal_logits()
    _, default = accept_drs(logits, gamma_percentile=80.0)
    _, with_low_max = accept_drs(logits, gamma_percentile=80.0, max_logit=-5.0)
    assert np.array_equal(default, with_low_max)


@pytest.mark.parametrize("gamma_percentile", [-1.0, 100.5, float("nan")])
def test_drs_invalid_percentile_raises(gamma_percentile):
    with pytest.raises(ValueError, match=f"gamma_percentile {gamma_percentile!r}"):
        accept_drs(normal_logits(), gamma_percentile)


@pytest.mark.parametrize("epsilon", [0.0, -1e-6, float("inf")])
def test_drs_invalid_epsilon_raises(epsilon):
    with pytest.raises(ValueError, match=f"epsilon {epsilon!r}"):
        accept_drs(normal_logits(), 50.0, epsilon=epsilon)


def test_drs_infinite_logit_raises():
    with pytest.raises(ValueError, match="infinite"):
        accept_drs(np.array([0.0, np.inf]), 50.0)


def test_curve_default_thresholds():
    curve = acceptance_curve(uniform_p(), None)
    assert curve["threshold"].tolist() == pytest.approx([i / 100 for i in range(101)])


def test_curve_omits_calibrated_column():
    curve = acceptance_curve(uniform_p(), None)
    assert list(curve.columns) == ["threshold", "acceptance_rate_raw"]


def test_curve_columns():
    p = uniform_p()
    curve = acceptance_curve(p, p**2)
    assert list(curve.columns) == ["threshold", "acceptance_rate_raw", "acceptance_rate_calibrated"]


@pytest.mark.parametrize("column", ["acceptance_rate_raw", "acceptance_rate_calibrated"])
def test_curve_monotone_non_increasing(column):
    p = uniform_p()
    curve = acceptance_curve(p, p**2)
    assert np.all(np.diff(curve[column].to_numpy()) <= 0.0)


def test_curve_matches_threshold_rule():
    p = np.array([0.1, 0.5, 0.5, 0.9])
    curve = acceptance_curve(p, None, thresholds=np.array([0.0, 0.5, 0.9, 1.0]))
    expected = [accept_threshold(p, t).mean() for t in (0.0, 0.5, 0.9, 1.0)]
    assert curve["acceptance_rate_raw"].tolist() == expected


def test_curve_invalid_threshold_raises():
    with pytest.raises(ValueError, match="threshold 1.2"):
        acceptance_curve(uniform_p(), None, thresholds=np.array([0.5, 1.2]))


def test_p_quantiles_keys():
    assert list(p_quantiles(uniform_p())) == [f"p{q}" for q in P_QUANTILE_PERCENTILES]


def test_p_quantiles_values():
    quantiles = p_quantiles(np.arange(101) / 100.0)
    assert quantiles == pytest.approx({f"p{q}": q / 100.0 for q in P_QUANTILE_PERCENTILES})


def test_p_quantiles_plain_floats():
    assert all(type(value) is float for value in p_quantiles(uniform_p()).values())


def test_no_fakes_message_names_threshold():
    p = uniform_p()
    with pytest.raises(NoFakesAcceptedError, match="threshold=0.95 on calibrated p"):
        check_accepted(accept_threshold(p, 0.95), p, "threshold=0.95 on calibrated p")


def test_no_fakes_message_gives_quantiles():
    p = np.linspace(0.12, 0.86, 1_001)
    with pytest.raises(NoFakesAcceptedError) as error:
        check_accepted(accept_threshold(p, 0.95), p, "threshold=0.95")
    assert "min 0.12" in str(error.value)
    assert "median 0.49" in str(error.value)
    assert "max 0.86" in str(error.value)


def test_no_fakes_message_suggests_threshold():
    p = np.linspace(0.12, 0.86, 1_001)
    with pytest.raises(NoFakesAcceptedError) as error:
        check_accepted(accept_threshold(p, 0.95), p, "threshold=0.95")
    assert "dvc exp run -S threshold=0.78" in str(error.value)
    assert "reject.rule=quantile" in str(error.value)


def test_no_fakes_error_is_value_error():
    assert issubclass(NoFakesAcceptedError, ValueError)


def test_no_fakes_error_is_user_error():
    assert issubclass(NoFakesAcceptedError, RsftError)


def test_no_fakes_all_zero_p_suggests_quantile():
    p = np.zeros(20)
    with pytest.raises(NoFakesAcceptedError) as error:
        check_accepted(accept_threshold(p, 0.0), p, "threshold=0.0")
    assert "dvc exp run" not in str(error.value)
    assert "reject.rule=quantile" in str(error.value)


def test_suggested_threshold_keeps_about_tenth():
    p = uniform_p(size=10_000)
    assert accept_threshold(p, suggest_threshold(p)).mean() == pytest.approx(0.1, abs=0.02)


def test_suggested_threshold_below_tied_p():
    p = np.full(50, 0.81)
    assert suggest_threshold(p) == 0.8


def test_check_all_kept_warns(caplog):
    p = uniform_p()
    with caplog.at_level(logging.WARNING, logger="rsft.rejection"):
        message = check_accepted(np.ones(p.size, dtype=bool), p, "threshold=0.0")
    assert "filtered nothing" in message
    assert message in caplog.text


def test_check_some_kept_returns_none():
    p = uniform_p()
    assert check_accepted(accept_threshold(p, 0.5), p, "threshold=0.5") is None


def test_check_length_mismatch_raises():
    with pytest.raises(ValueError, match="3 entries and p has 2"):
        check_accepted(np.ones(3, dtype=bool), np.array([0.1, 0.2]), "threshold=0.5")
