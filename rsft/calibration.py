"""Calibration of discriminator scores and the metrics that measure it.

A trained discriminator's raw p = sigmoid(D(x)) is not a calibrated probability:
late in training the raw p of fakes can sit between 0.42 and 0.65, so a fixed
threshold keeps nothing in one run and most fakes in another. A calibrator maps a
logit D(x) to an estimate of P(real | x) under a 50/50 prior. It is fit on logits of
held-out real images (the validation split) and of fresh fakes that are not the
ones being scored later.

Labels follow one convention everywhere in this module: 1 is real, 0 is fake.
All functions take and return numpy arrays and are deterministic.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = ("none", "platt", "isotonic")

# Fewer logits than this per class give a calibrator that mostly fits noise.
MIN_SAMPLES_PER_CLASS = 10

# Inverse L2 strength (sklearn's C) of Platt scaling, on a loss whose sample weights
# average 1. Its pull on the slope is negligible at thousands of samples, but it keeps
# the slope finite when real and fake logits are perfectly separated.
PLATT_INVERSE_REGULARIZATION = 1e4

RELIABILITY_COLUMNS = ("bin_lower", "bin_upper", "mean_predicted", "fraction_real", "count")


class Calibrator(ABC):
    """Map from discriminator logits to calibrated probabilities of "real".

    Build one with fit_calibrator() or restore one with Calibrator.from_dict().
    """

    method: ClassVar[str]

    @abstractmethod
    def predict(self, logits: np.ndarray) -> np.ndarray:
        """Compute calibrated probabilities of "real".

        Args:
            logits: Discriminator logits D(x) of any shape. NaN is invalid.

        Returns:
            Float64 probabilities in [0, 1] with the shape of `logits`.
        """

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Return the fitted parameters as plain Python values for json.dumps()."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibrator:
        """Rebuild a calibrator from the output of to_dict().

        Args:
            data: Mapping with a "method" key and that method's parameters.

        Returns:
            A calibrator whose predictions equal those of the one that was saved.

        Raises:
            ValueError: If the method is unknown or a key is missing or unknown.
        """
        if not isinstance(data, dict):
            raise ValueError(f"Invalid saved calibrator: expected a dict, got {type(data).__name__}")

        method = data.get("method")
        if method not in _CALIBRATOR_CLASSES:
            raise ValueError(
                f"Invalid calibration method {method!r} in saved calibrator; "
                f"expected one of {', '.join(CALIBRATION_METHODS)}"
            )

        calibrator_class = _CALIBRATOR_CLASSES[method]
        expected_keys = {"method", *calibrator_class.parameter_names()}
        if set(data) != expected_keys:
            raise ValueError(
                f"Invalid keys for a saved {method} calibrator: got {sorted(data)}, "
                f"expected {sorted(expected_keys)}"
            )

        parameters = {key: value for key, value in data.items() if key != "method"}
        return calibrator_class.from_parameters(parameters)

    @classmethod
    @abstractmethod
    def parameter_names(cls) -> tuple[str, ...]:
        """Return the keys that to_dict() writes besides "method"."""

    @classmethod
    @abstractmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> Calibrator:
        """Build the calibrator from the parameters that to_dict() wrote."""


@dataclass(frozen=True)
class IdentityCalibrator(Calibrator):
    """Raw p = sigmoid(logit), for runs that skip calibration."""

    method: ClassVar[str] = "none"

    def predict(self, logits: np.ndarray) -> np.ndarray:
        return expit(_as_logits(logits))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method}

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        return ()

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> IdentityCalibrator:
        return cls()


@dataclass(frozen=True)
class PlattCalibrator(Calibrator):
    """Platt scaling: p = sigmoid(a * logit + b).

    Attributes:
        a: Slope on the logit. Values above 1 sharpen an under-confident discriminator.
        b: Intercept. It corrects a discriminator biased towards one class.
    """

    method: ClassVar[str] = "platt"
    a: float
    b: float

    def predict(self, logits: np.ndarray) -> np.ndarray:
        return expit(self.a * _as_logits(logits) + self.b)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "a": self.a, "b": self.b}

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        return ("a", "b")

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> PlattCalibrator:
        return cls(a=float(parameters["a"]), b=float(parameters["b"]))


@dataclass(frozen=True)
class IsotonicCalibrator(Calibrator):
    """Isotonic regression on the logit, stored as its fitted breakpoints.

    Prediction interpolates linearly between breakpoints and clips outside them, as
    sklearn's IsotonicRegression(out_of_bounds="clip") does. Fitted and restored
    calibrators share this code path, so their predictions are identical.

    Attributes:
        x_thresholds: Increasing logits of the breakpoints (sklearn's X_thresholds_).
        y_thresholds: Non-decreasing probabilities at the breakpoints (y_thresholds_).
    """

    method: ClassVar[str] = "isotonic"
    x_thresholds: tuple[float, ...]
    y_thresholds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.x_thresholds) == 0 or len(self.x_thresholds) != len(self.y_thresholds):
            raise ValueError(
                f"Invalid isotonic breakpoints: {len(self.x_thresholds)} x values and "
                f"{len(self.y_thresholds)} y values; expected equal, non-zero counts"
            )

    def predict(self, logits: np.ndarray) -> np.ndarray:
        values = _as_logits(logits)
        x_thresholds = np.asarray(self.x_thresholds, dtype=np.float64)
        y_thresholds = np.asarray(self.y_thresholds, dtype=np.float64)
        return np.interp(values, x_thresholds, y_thresholds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "x_thresholds": list(self.x_thresholds),
            "y_thresholds": list(self.y_thresholds),
        }

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        return ("x_thresholds", "y_thresholds")

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> IsotonicCalibrator:
        return cls(
            x_thresholds=tuple(float(x) for x in parameters["x_thresholds"]),
            y_thresholds=tuple(float(y) for y in parameters["y_thresholds"]),
        )


_CALIBRATOR_CLASSES: dict[str, type[Calibrator]] = {
    IdentityCalibrator.method: IdentityCalibrator,
    PlattCalibrator.method: PlattCalibrator,
    IsotonicCalibrator.method: IsotonicCalibrator,
}


def fit_calibrator(method: str, logits_real: np.ndarray, logits_fake: np.ndarray) -> Calibrator:
    """Fit a calibrator that maps a logit to P(real | x) under a 50/50 prior.

    Each class gets the same total sample weight, so unequal numbers of real and fake
    logits do not shift the prior.

    Args:
        method: One of CALIBRATION_METHODS. "none" ignores the logits after validation.
        logits_real: 1-D logits of held-out real images.
        logits_fake: 1-D logits of fresh fakes, not the fakes that will be scored.

    Returns:
        The fitted calibrator.

    Raises:
        ValueError: If the method is unknown, a logit is NaN or infinite, or a class
            has fewer than MIN_SAMPLES_PER_CLASS logits.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(
            f"Invalid calibration method {method!r}; expected one of {', '.join(CALIBRATION_METHODS)}"
        )

    real = _as_finite_vector(logits_real, "logits_real")
    fake = _as_finite_vector(logits_fake, "logits_fake")
    if real.size < MIN_SAMPLES_PER_CLASS or fake.size < MIN_SAMPLES_PER_CLASS:
        raise ValueError(
            f"Too few logits to fit calibration: got {real.size} real and {fake.size} fake, "
            f"need at least {MIN_SAMPLES_PER_CLASS} per class"
        )

    logits = np.concatenate([real, fake])
    labels = np.concatenate([np.ones(real.size), np.zeros(fake.size)])
    sample_weight = _balanced_weights(real.size, fake.size)

    if method == "none":
        calibrator: Calibrator = IdentityCalibrator()
    elif method == "platt":
        calibrator = _fit_platt(logits, labels, sample_weight)
    else:
        calibrator = _fit_isotonic(logits, labels, sample_weight)

    logger.info(
        "Fitted %s calibration on %d real and %d fake logits: %s",
        method,
        real.size,
        fake.size,
        _describe(calibrator),
    )
    return calibrator


def _fit_platt(logits: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray) -> PlattCalibrator:
    regression = LogisticRegression(
        C=PLATT_INVERSE_REGULARIZATION,
        solver="newton-cholesky",
        tol=1e-10,
        max_iter=1000,
    )
    regression.fit(logits.reshape(-1, 1), labels, sample_weight=sample_weight)
    return PlattCalibrator(a=float(regression.coef_[0, 0]), b=float(regression.intercept_[0]))


def _fit_isotonic(logits: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray) -> IsotonicCalibrator:
    regression = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    regression.fit(logits, labels, sample_weight=sample_weight)
    return IsotonicCalibrator(
        x_thresholds=tuple(float(x) for x in regression.X_thresholds_),
        y_thresholds=tuple(float(y) for y in regression.y_thresholds_),
    )


def _balanced_weights(num_real: int, num_fake: int) -> np.ndarray:
    """Return per-sample weights that give each class half of the total weight, mean 1."""
    total = num_real + num_fake
    real_weight = total / (2.0 * num_real)
    fake_weight = total / (2.0 * num_fake)
    return np.concatenate([np.full(num_real, real_weight), np.full(num_fake, fake_weight)])


def _describe(calibrator: Calibrator) -> str:
    if isinstance(calibrator, PlattCalibrator):
        return f"a={calibrator.a:.4g}, b={calibrator.b:.4g}"
    if isinstance(calibrator, IsotonicCalibrator):
        return f"{len(calibrator.x_thresholds)} breakpoints"
    return "identity on sigmoid(logit)"


def brier_score(p: np.ndarray, labels: np.ndarray) -> float:
    """Compute the Brier score, the mean squared error of p against 0/1 labels.

    Args:
        p: 1-D predicted probabilities of "real" in [0, 1].
        labels: 1-D labels of the same length, 1 for real and 0 for fake.

    Returns:
        The score in [0, 1]. Lower is better, and a constant 0.5 scores 0.25.

    Raises:
        ValueError: If the inputs are empty, differ in length, or hold invalid values.
    """
    probabilities, binary_labels = _validate_predictions(p, labels)
    return float(np.mean((probabilities - binary_labels) ** 2))


def expected_calibration_error(p: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    """Compute the expected calibration error (ECE) over equal-width bins of p.

    ECE is the count-weighted mean, over non-empty bins, of |mean p - fraction real|.

    Args:
        p: 1-D predicted probabilities of "real" in [0, 1].
        labels: 1-D labels of the same length, 1 for real and 0 for fake.
        num_bins: Number of equal-width bins on [0, 1].

    Returns:
        The ECE in [0, 1]. 0 means calibrated at this binning.

    Raises:
        ValueError: If the inputs are invalid or num_bins < 1.
    """
    table = reliability_table(p, labels, num_bins)
    gaps = (table["mean_predicted"] - table["fraction_real"]).abs()
    return float(np.sum(gaps * table["count"]) / table["count"].sum())


def reliability_table(p: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> pd.DataFrame:
    """Bin p into equal-width bins and compare mean p with the fraction of reals per bin.

    Bin k covers [k / num_bins, (k + 1) / num_bins), and the last bin also includes 1.
    The rows suit a DVC plot of mean_predicted against fraction_real.

    Args:
        p: 1-D predicted probabilities of "real" in [0, 1].
        labels: 1-D labels of the same length, 1 for real and 0 for fake.
        num_bins: Number of equal-width bins on [0, 1].

    Returns:
        One row per non-empty bin, in increasing order, with the columns of
        RELIABILITY_COLUMNS. count is an int, the other columns are floats.

    Raises:
        ValueError: If the inputs are invalid or num_bins < 1.
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"Invalid num_bins {num_bins!r}; expected an integer >= 1")

    probabilities, binary_labels = _validate_predictions(p, labels)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bin_index = np.minimum(np.floor(probabilities * num_bins).astype(np.int64), num_bins - 1)

    count = np.bincount(bin_index, minlength=num_bins)
    sum_predicted = np.bincount(bin_index, weights=probabilities, minlength=num_bins)
    sum_real = np.bincount(bin_index, weights=binary_labels, minlength=num_bins)

    non_empty = count > 0
    return pd.DataFrame(
        {
            "bin_lower": edges[:-1][non_empty],
            "bin_upper": edges[1:][non_empty],
            "mean_predicted": sum_predicted[non_empty] / count[non_empty],
            "fraction_real": sum_real[non_empty] / count[non_empty],
            "count": count[non_empty],
        },
        columns=list(RELIABILITY_COLUMNS),
    )


def _as_logits(logits: np.ndarray) -> np.ndarray:
    values = np.asarray(logits, dtype=np.float64)
    if np.isnan(values).any():
        raise ValueError(f"Invalid logits: {int(np.isnan(values).sum())} of {values.size} are NaN")
    return values


def _as_finite_vector(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"Invalid {name}: expected a 1-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(
            f"Invalid {name}: {int((~np.isfinite(array)).sum())} of {array.size} values are NaN or infinite"
        )
    return array


def _validate_predictions(p: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities = _as_finite_vector(p, "p")
    binary_labels = _as_finite_vector(labels, "labels")

    if probabilities.size == 0:
        raise ValueError("Invalid p: the array is empty")
    if probabilities.size != binary_labels.size:
        raise ValueError(
            f"Length mismatch: {probabilities.size} probabilities and {binary_labels.size} labels"
        )
    if probabilities.min() < 0.0 or probabilities.max() > 1.0:
        raise ValueError(
            f"Invalid p: values must lie in [0, 1], got min {probabilities.min():.6g} "
            f"and max {probabilities.max():.6g}. Pass probabilities, not logits."
        )
    if not np.isin(binary_labels, (0.0, 1.0)).all():
        raise ValueError("Invalid labels: expected only 0 (fake) and 1 (real)")
    return probabilities, binary_labels


__all__ = [
    "CALIBRATION_METHODS",
    "MIN_SAMPLES_PER_CLASS",
    "RELIABILITY_COLUMNS",
    "Calibrator",
    "IdentityCalibrator",
    "IsotonicCalibrator",
    "PlattCalibrator",
    "brier_score",
    "expected_calibration_error",
    "fit_calibrator",
    "reliability_table",
]

