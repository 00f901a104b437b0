"""Specifications of rsft.metrics on constructed feature sets with known values."""

import logging
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from rsft import metrics
from rsft.metrics import (
    KEY_COVERAGE,
    KEY_DENSITY,
    KEY_LABEL_ENTROPY,
    KEY_NUM_MODES,
    KEY_PRECISION,
    KEY_RECALL,
    MetricInputError,
    class_fraction_key,
    features_to_fid,
    features_to_kid,
    features_to_prdc,
    features_to_statistics,
    finite_metrics,
    labels_to_mode_coverage,
    statistics_to_fid,
)


class FeaturePassthrough(torch.nn.Module):
    """Feature extractor for torchmetrics that returns its input, which is already features.

    torchmetrics reads ``num_features`` instead of running a dummy image through the module.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def reference_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Compute PRDC from full distance matrices with open balls, like the authors' code."""
    real_radii = np.sort(scipy.spatial.distance.cdist(real, real), axis=1)[:, k]
    fake_radii = np.sort(scipy.spatial.distance.cdist(fake, fake), axis=1)[:, k]
    real_to_fake = scipy.spatial.distance.cdist(real, fake)

    inside_real_balls = real_to_fake < real_radii[:, np.newaxis]
    inside_fake_balls = real_to_fake < fake_radii[np.newaxis, :]
    return {
        KEY_PRECISION: inside_real_balls.any(axis=0).mean(),
        KEY_RECALL: inside_fake_balls.any(axis=1).mean(),
        KEY_DENSITY: inside_real_balls.sum() / (k * len(fake)),
        KEY_COVERAGE: (real_to_fake.min(axis=1) < real_radii).mean(),
    }


# FID


def test_fid_same_set_is_zero(rng):
    features = rng.normal(size=(1000, 16))

    assert features_to_fid(features, features) == pytest.approx(0.0, abs=1e-9)


def test_fid_shifted_set_is_squared_shift(rng):
    features = rng.normal(size=(1000, 16))
    shift = np.linspace(-1.0, 2.0, 16)

    fid = features_to_fid(features, features + shift)

    assert fid == pytest.approx(np.sum(shift**2), rel=1e-9)


def test_fid_diagonal_gaussians_closed_form():
    mu1 = np.array([0.0, 1.0, -2.0, 0.5])
    mu2 = np.array([1.0, 1.0, 0.0, -0.5])
    variances1 = np.array([1.0, 4.0, 0.25, 2.0])
    variances2 = np.array([2.0, 1.0, 0.25, 9.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(
        variances1 + variances2 - 2 * np.sqrt(variances1 * variances2)
    )

    fid = statistics_to_fid(mu1, np.diag(variances1), mu2, np.diag(variances2))

    assert fid == pytest.approx(expected, abs=1e-3)


def test_fid_full_covariances_match_sqrtm(rng):
    dim = 12
    factor1 = rng.normal(size=(dim, dim))
    factor2 = rng.normal(size=(dim, dim))
    sigma1 = factor1 @ factor1.T + 0.1 * np.eye(dim)
    sigma2 = factor2 @ factor2.T + 0.1 * np.eye(dim)
    mu1 = rng.normal(size=dim)
    mu2 = rng.normal(size=dim)
    # The textbook formula, with scipy's general matrix square root of the non-symmetric product.
    trace_sqrt = np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt

    fid = statistics_to_fid(mu1, sigma1, mu2, sigma2)

    assert fid == pytest.approx(expected, rel=1e-9)


def test_fid_matches_torchmetrics(rng):
    dim = 32
    real = rng.normal(size=(2000, dim))
    fake = 1.5 * rng.normal(size=(2000, dim)) @ rng.normal(size=(dim, dim)) / math.sqrt(dim) + 0.3
    torchmetrics_fid = FrechetInceptionDistance(feature=FeaturePassthrough(dim))
    torchmetrics_fid.update(torch.from_numpy(real), real=True)
    torchmetrics_fid.update(torch.from_numpy(fake), real=False)
    expected = float(torchmetrics_fid.compute())

    fid = features_to_fid(real, fake)

    assert fid == pytest.approx(expected, rel=1e-3)


def test_fid_warns_when_fewer_samples_than_dimensions(rng, caplog):
    real = rng.normal(size=(20, 32))
    fake = rng.normal(size=(20, 32))

    with caplog.at_level(logging.WARNING, logger="rsft.metrics"):
        fid = features_to_fid(real, fake)

    assert "covariance is singular" in caplog.text
    assert math.isfinite(fid)


def test_fid_no_warning_with_enough_samples(rng, caplog):
    features = rng.normal(size=(100, 8))

    with caplog.at_level(logging.WARNING, logger="rsft.metrics"):
        features_to_statistics(features)

    assert caplog.text == ""


def test_fid_rejects_single_sample(rng):
    with pytest.raises(MetricInputError, match=r"FID requires at least 2 samples in b, got 1"):
        features_to_fid(rng.normal(size=(10, 4)), rng.normal(size=(1, 4)))


def test_fid_rejects_mismatched_dimensions(rng):
    with pytest.raises(ValueError, match="different feature dimensions, 4 and 5"):
        features_to_fid(rng.normal(size=(10, 4)), rng.normal(size=(10, 5)))


def test_fid_rejects_nan(rng):
    features = rng.normal(size=(10, 4))
    features[3, 2] = np.nan

    with pytest.raises(ValueError, match="NaN or infinite values in a"):
        features_to_fid(features, rng.normal(size=(10, 4)))


def test_fid_rejects_indefinite_covariance():
    mu = np.zeros(2)
    indefinite = np.diag([1.0, -1.0])

    with pytest.raises(ValueError, match="imaginary component"):
        statistics_to_fid(mu, np.eye(2), mu, indefinite)


# KID


def test_kid_same_distribution_is_near_zero(rng):
    a = rng.normal(size=(1000, 16))
    b = rng.normal(size=(1000, 16))

    kid_mean, _ = features_to_kid(a, b, num_subsets=10, subset_size=300)

    assert abs(kid_mean) < 0.02


def test_kid_shifted_distribution_is_positive(rng):
    a = rng.normal(size=(1000, 16))
    b = rng.normal(size=(1000, 16)) + 0.5

    kid_mean, kid_std = features_to_kid(a, b, num_subsets=10, subset_size=300)

    assert kid_mean > 0.5
    assert kid_mean > 5 * kid_std


def test_kid_clips_subset_size(rng, caplog):
    a = rng.normal(size=(50, 8))
    b = rng.normal(size=(80, 8)) + 0.5

    with caplog.at_level(logging.INFO, logger="rsft.metrics"):
        clipped = features_to_kid(a, b, num_subsets=5, subset_size=1000, seed=3)

    assert clipped == features_to_kid(a, b, num_subsets=5, subset_size=50, seed=3)
    assert "using 50" in caplog.text


def test_kid_same_seed_is_deterministic(rng):
    a = rng.normal(size=(300, 8))
    b = rng.normal(size=(300, 8)) + 0.2

    first = features_to_kid(a, b, num_subsets=10, subset_size=100, seed=7)
    second = features_to_kid(a, b, num_subsets=10, subset_size=100, seed=7)
    other_seed = features_to_kid(a, b, num_subsets=10, subset_size=100, seed=8)

    assert first == second
    assert first != other_seed


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_full_sets_match_torchmetrics(rng):
    # With one subset that contains every sample, the random draw no longer matters.
    dim = 16
    a = rng.normal(size=(400, dim))
    b = rng.normal(size=(400, dim)) * 1.2 + 0.3
    torchmetrics_kid = KernelInceptionDistance(
        feature=FeaturePassthrough(dim), subsets=1, subset_size=400
    )
    torchmetrics_kid.update(torch.from_numpy(a), real=True)
    torchmetrics_kid.update(torch.from_numpy(b), real=False)
    expected_mean, _ = torchmetrics_kid.compute()

    kid_mean, kid_std = features_to_kid(a, b, num_subsets=1, subset_size=400)

    assert kid_mean == pytest.approx(float(expected_mean), rel=1e-9)
    assert kid_std == 0.0


def test_kid_rejects_single_sample(rng):
    with pytest.raises(MetricInputError, match=r"KID requires at least 2 samples in a, got 1"):
        features_to_kid(rng.normal(size=(1, 4)), rng.normal(size=(10, 4)))


# Precision, recall, density and coverage


def test_prdc_identical_sets(rng):
    features = rng.normal(size=(1000, 16))

    result = features_to_prdc(features, features)

    assert result[KEY_PRECISION] == 1.0
    assert result[KEY_RECALL] == 1.0
    assert result[KEY_COVERAGE] == 1.0
    # Each open ball contains its centre and k - 1 neighbours, so k fakes and density 1.
    # Rounding moves a few k-th neighbours across the boundary.
    assert result[KEY_DENSITY] == pytest.approx(1.0, abs=0.02)


def test_prdc_same_distribution_density_near_one(rng):
    real = rng.normal(size=(2000, 8))
    fake = rng.normal(size=(2000, 8))

    result = features_to_prdc(real, fake)

    assert result[KEY_DENSITY] == pytest.approx(1.0, abs=0.1)


def test_prdc_disjoint_sets_are_zero(rng):
    real = rng.normal(size=(500, 8))
    fake = rng.normal(size=(500, 8)) + 100.0

    result = features_to_prdc(real, fake)

    assert result == {KEY_PRECISION: 0.0, KEY_RECALL: 0.0, KEY_DENSITY: 0.0, KEY_COVERAGE: 0.0}


def test_prdc_collapsed_generator(rng):
    # Five well-separated real modes, and a generator that covers only the first one.
    dim = 8
    mode_centres = 20.0 * np.eye(dim)[:5]
    real = np.concatenate([centre + rng.normal(size=(200, dim)) for centre in mode_centres])
    fake = mode_centres[0] + 0.5 * rng.normal(size=(1000, dim))

    result = features_to_prdc(real, fake)

    assert result[KEY_PRECISION] > 0.9
    assert result[KEY_RECALL] < 0.2
    assert result[KEY_COVERAGE] < 0.2
    assert result[KEY_PRECISION] > result[KEY_RECALL]


def test_prdc_blocks_match_full_matrix(rng, monkeypatch):
    # Blocks of 10 rows (1000 / 97 columns) exercise the accumulation across blocks.
    monkeypatch.setattr(metrics, "_MAX_DISTANCE_BLOCK_ENTRIES", 1000)
    real = rng.normal(size=(97, 6))
    fake = rng.normal(size=(83, 6)) * 1.3 + 0.2

    result = features_to_prdc(real, fake, k=3)
    expected = reference_prdc(real, fake, k=3)

    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def test_prdc_rejects_only_k_samples(rng):
    expected_message = r"PRDC with k=5 requires at least 6 samples in fake, got 5"

    with pytest.raises(MetricInputError, match=expected_message):
        features_to_prdc(rng.normal(size=(10, 4)), rng.normal(size=(5, 4)))


def test_prdc_rejects_infinity(rng):
    fake = rng.normal(size=(10, 4))
    fake[0, 0] = np.inf

    with pytest.raises(ValueError, match="NaN or infinite values in fake"):
        features_to_prdc(rng.normal(size=(10, 4)), fake)


# Mode coverage


def test_mode_coverage_uniform_labels():
    labels = np.arange(1000) % 10

    result = labels_to_mode_coverage(labels)

    assert result[KEY_LABEL_ENTROPY] == pytest.approx(math.log(10))
    assert result[KEY_NUM_MODES] == 10
    assert result[class_fraction_key(3)] == pytest.approx(0.1)


def test_mode_coverage_single_class():
    labels = np.full(500, 7)

    result = labels_to_mode_coverage(labels)

    assert result[KEY_LABEL_ENTROPY] == 0.0
    assert result[KEY_NUM_MODES] == 1
    assert result[class_fraction_key(7)] == 1.0


def test_mode_coverage_two_equal_classes():
    labels = np.array([2, 5] * 50)

    result = labels_to_mode_coverage(labels)

    assert result[KEY_LABEL_ENTROPY] == pytest.approx(math.log(2))
    assert result[KEY_NUM_MODES] == 2


def test_mode_coverage_min_fraction_threshold():
    # Class 9 contains 0.5% of the labels, below the 1% threshold.
    labels = np.concatenate([np.zeros(995, dtype=int), np.full(5, 9)])

    result = labels_to_mode_coverage(labels, min_fraction=0.01)

    assert result[KEY_NUM_MODES] == 1
    assert result[class_fraction_key(9)] == pytest.approx(0.005)


def test_mode_coverage_rejects_out_of_range_label():
    with pytest.raises(ValueError, match=r"Labels must be in \[0, 10\)"):
        labels_to_mode_coverage(np.array([0, 3, 10]))


def test_mode_coverage_rejects_empty_labels():
    with pytest.raises(MetricInputError, match="at least 1 label, got 0"):
        labels_to_mode_coverage(np.array([], dtype=int))


# finite_metrics


def test_finite_metrics_drops_nan_and_inf(caplog):
    with caplog.at_level(logging.WARNING, logger="rsft.metrics"):
        finite = finite_metrics({"fid": float("nan"), "kid_mean": math.inf, "precision": 0.5})

    assert finite == {"precision": 0.5}
    assert "'fid'" in caplog.text
    assert "'kid_mean'" in caplog.text


def test_finite_metrics_rejects_non_number():
    with pytest.raises(TypeError, match="'fid' has value 'low'"):
        finite_metrics({"fid": "low"})
