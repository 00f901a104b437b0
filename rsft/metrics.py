"""Sample-quality metrics computed from evaluator features and predicted labels.

Every function here is pure. The features are arrays of shape [n, d] taken from the
penultimate layer of the Fashion-MNIST evaluator classifier, not from Inception v3, so
the values are comparable only with other values computed from the same evaluator.
All arithmetic runs in float64.

The metrics and their sources:
- FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to
  a Local Nash Equilibrium".
- KID: Binkowski et al. 2018, "Demystifying MMD GANs".
- Precision and recall: Kynkaanniemi et al. 2019, "Improved Precision and Recall
  Metric for Assessing Generative Models".
- Density and coverage: Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics
  for Generative Models".
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterator, Mapping

import numpy as np

from rsft.errors import RsftError

logger = logging.getLogger(__name__)

KEY_FID = "fid"
KEY_KID_MEAN = "kid_mean"
KEY_KID_STD = "kid_std"
KEY_PRECISION = "precision"
KEY_RECALL = "recall"
KEY_DENSITY = "density"
KEY_COVERAGE = "coverage"
KEY_LABEL_ENTROPY = "label_entropy"
KEY_NUM_MODES = "num_modes"
# Followed by the class index: "class_fraction_0" ... "class_fraction_9".
KEY_CLASS_FRACTION_PREFIX = "class_fraction_"

# A square root whose imaginary part exceeds this absolute bound means that a
# covariance matrix is not positive semi-definite. Smaller imaginary parts come from
# rounding and are dropped. pytorch-fid (mseitzer/pytorch-fid, fid_score.py) applies
# the same bound to the diagonal of scipy.linalg.sqrtm's result.
_MAX_IMAGINARY_COMPONENT = 1e-3

# Maximum number of float64 entries in one block of pairwise distances (64 MiB).
# The k-th neighbour selection copies a block, so the distance work of PRDC peaks at a
# few times this size, independent of the number of samples.
_MAX_DISTANCE_BLOCK_ENTRIES = 2**23


class MetricInputError(RsftError, ValueError):
    """Error raised when an input has too few samples for a metric.

    Callers may catch it to skip one metric, for example when rejection sampling keeps
    only a handful of samples.
    """


def class_fraction_key(label: int) -> str:
    """Return the metrics key of the fraction of samples predicted as class ``label``."""
    return f"{KEY_CLASS_FRACTION_PREFIX}{label}"


def features_to_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compute the mean and the unbiased covariance of features, for FID.

    Logs a warning when there are no more samples than feature dimensions, because the
    sample covariance then has rank below d and FID is unreliable.

    Args:
        features: Array of shape [n, d] with n >= 2.

    Returns:
        The mean, shape [d], and the covariance (divided by n - 1), shape [d, d], both
        float64.

    Raises:
        MetricInputError: If n < 2.
        ValueError: If ``features`` is not 2-D or contains NaN or infinity.
    """
    features = _validate_features(features, metric="FID", min_samples=2)
    num_samples, dim = features.shape

    if num_samples <= dim:
        logger.warning(
            "FID statistics from %d samples of dimension %d: the covariance is singular "
            "(rank at most %d), so FID is unreliable. Use more than %d samples.",
            num_samples, dim, num_samples - 1, dim,
        )

    mean = features.mean(axis=0)
    centered = features - mean
    covariance = centered.T @ centered / (num_samples - 1)
    return mean, covariance


def statistics_to_fid(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Compute the Frechet distance between two Gaussians.

    FID = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)). The trace of
    the matrix square root equals the sum of the square roots of the eigenvalues of
    sigma1^(1/2) sigma2 sigma1^(1/2). That matrix is symmetric, so ``numpy.linalg.eigvalsh``
    applies, which stays stable for singular covariances where ``scipy.linalg.sqrtm``
    can return NaN.

    Args:
        mu1: Mean of the first Gaussian, shape [d].
        sigma1: Covariance of the first Gaussian, shape [d, d], positive semi-definite.
        mu2: Mean of the second Gaussian, shape [d].
        sigma2: Covariance of the second Gaussian, shape [d, d], positive semi-definite.

    Returns:
        The squared Frechet distance. It can be slightly below zero through rounding
        when the two Gaussians are equal.

    Raises:
        ValueError: If the shapes do not match, a value is NaN or infinite, or a
            covariance has a negative eigenvalue large enough that its square root has an
            imaginary part above 1e-3.
    """
    mu1, sigma1 = _validate_statistics(mu1, sigma1, name="1")
    mu2, sigma2 = _validate_statistics(mu2, sigma2, name="2")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"FID statistics have different dimensions: mu1 has {mu1.shape[0]}, "
            f"mu2 has {mu2.shape[0]}. Compute both from the same evaluator layer."
        )

    mean_term = float(np.sum((mu1 - mu2) ** 2))

    eigenvalues1, eigenvectors1 = np.linalg.eigh(sigma1)
    roots1 = _eigenvalues_to_real_roots(eigenvalues1, matrix_name="sigma1")
    sqrt_sigma1 = (eigenvectors1 * roots1) @ eigenvectors1.T

    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    product = (product + product.T) / 2
    product_roots = _eigenvalues_to_real_roots(
        np.linalg.eigvalsh(product), matrix_name="sigma1^(1/2) sigma2 sigma1^(1/2)"
    )

    trace_term = float(np.trace(sigma1) + np.trace(sigma2) - 2 * product_roots.sum())
    return mean_term + trace_term


def features_to_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Compute FID between two feature sets. The order of the sets does not matter.

    Args:
        a: Features of shape [n_a, d] with n_a >= 2.
        b: Features of shape [n_b, d] with n_b >= 2.

    Returns:
        The FID.

    Raises:
        MetricInputError: If either set has fewer than 2 samples.
        ValueError: If the feature dimensions differ or a value is NaN or infinite.
    """
    a = _validate_features(a, metric="FID", min_samples=2, name="a")
    b = _validate_features(b, metric="FID", min_samples=2, name="b")
    _validate_same_dimension(a, b, metric="FID")

    mu_a, sigma_a = features_to_statistics(a)
    mu_b, sigma_b = features_to_statistics(b)
    return statistics_to_fid(mu_a, sigma_a, mu_b, sigma_b)


def features_to_kid(
    a: np.ndarray,
    b: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Compute KID, the unbiased MMD^2 estimate averaged over random subsets.

    The kernel is k(x, y) = (x . y / d + 1)^3. Each subset draws ``subset_size`` rows
    from each set without replacement. A ``subset_size`` above the smaller set size is
    reduced to that size and logged at info level. The order of the sets does not matter.

    Args:
        a: Features of shape [n_a, d] with n_a >= 2.
        b: Features of shape [n_b, d] with n_b >= 2.
        num_subsets: Number of random subsets, at least 1.
        subset_size: Rows drawn from each set per subset, at least 2.
        seed: Seed of the ``numpy.random.Generator`` that draws the subsets.

    Returns:
        The mean and the population standard deviation of MMD^2 over the subsets, as
        torchmetrics' KernelInceptionDistance reports them. The mean can be slightly
        negative when the sets come from the same distribution.

    Raises:
        MetricInputError: If either set has fewer than 2 samples.
        ValueError: If ``num_subsets`` < 1, ``subset_size`` < 2, the feature dimensions
            differ or a value is NaN or infinite.
    """
    if num_subsets < 1:
        raise ValueError(f"KID num_subsets must be at least 1, got {num_subsets}.")
    if subset_size < 2:
        raise ValueError(f"KID subset_size must be at least 2, got {subset_size}.")

    a = _validate_features(a, metric="KID", min_samples=2, name="a")
    b = _validate_features(b, metric="KID", min_samples=2, name="b")
    _validate_same_dimension(a, b, metric="KID")

    max_subset_size = min(len(a), len(b))
    if subset_size > max_subset_size:
        logger.info(
            "KID subset_size %d exceeds the smaller set size; using %d.",
            subset_size, max_subset_size,
        )
        subset_size = max_subset_size

    rng = np.random.default_rng(seed)
    mmd_values = np.empty(num_subsets)
    for i in range(num_subsets):
        a_subset = a[rng.choice(len(a), size=subset_size, replace=False)]
        b_subset = b[rng.choice(len(b), size=subset_size, replace=False)]
        mmd_values[i] = _polynomial_mmd(a_subset, b_subset)

    return float(mmd_values.mean()), float(mmd_values.std())


def features_to_prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Compute precision, recall, density and coverage from k-nearest-neighbour balls.

    Each sample's ball is centred on it with the radius of the distance to its k-th
    nearest neighbour in its own set, the sample itself excluded. Balls are open, as in
    the authors' reference code (github.com/clovaai/generative-evaluation-prdc), so a
    point on the boundary is outside. With n real and m fake samples:
    - precision: fraction of fakes inside at least one real ball.
    - recall: fraction of reals inside at least one fake ball.
    - density: number of (real ball, fake) containments divided by k * m. It is near 1
      when fakes follow the real distribution and can exceed 1.
    - coverage: fraction of real balls that contain at least one fake.

    Distances are computed in blocks of at most 2^23 entries, so memory stays at a few
    hundred MiB for 10,000 samples per set (164 MiB traced by tracemalloc at d = 128 in
    benchmarks/bench_metrics.py).

    Args:
        real: Real features of shape [n, d] with n > k.
        fake: Generated features of shape [m, d] with m > k.
        k: Neighbour index that sets the ball radius, at least 1.

    Returns:
        A dict with keys KEY_PRECISION, KEY_RECALL, KEY_DENSITY and KEY_COVERAGE.

    Raises:
        MetricInputError: If either set has k or fewer samples.
        ValueError: If k < 1, the feature dimensions differ or a value is NaN or
            infinite.
    """
    if k < 1:
        raise ValueError(f"PRDC k must be at least 1, got {k}.")

    metric = f"PRDC with k={k}"
    real = _validate_features(real, metric=metric, min_samples=k + 1, name="real")
    fake = _validate_features(fake, metric=metric, min_samples=k + 1, name="fake")
    _validate_same_dimension(real, fake, metric="PRDC")

    real_radii_squared = _kth_neighbour_squared_distances(real, k)
    fake_radii_squared = _kth_neighbour_squared_distances(fake, k)

    # One pass over blocks of fakes (rows) against all reals (columns) collects all four.
    fakes_in_real_manifold = 0
    containment_count = 0
    reals_in_fake_manifold = np.zeros(len(real), dtype=bool)
    real_to_nearest_fake_squared = np.full(len(real), np.inf)
    for start, stop, squared_distances in _squared_distance_blocks(fake, real):
        inside_real_balls = squared_distances < real_radii_squared[np.newaxis, :]
        fakes_in_real_manifold += int(inside_real_balls.any(axis=1).sum())
        containment_count += int(inside_real_balls.sum())

        inside_fake_balls = squared_distances < fake_radii_squared[start:stop, np.newaxis]
        reals_in_fake_manifold |= inside_fake_balls.any(axis=0)

        np.minimum(
            real_to_nearest_fake_squared,
            squared_distances.min(axis=0),
            out=real_to_nearest_fake_squared,
        )

    return {
        KEY_PRECISION: fakes_in_real_manifold / len(fake),
        KEY_RECALL: float(reals_in_fake_manifold.mean()),
        KEY_DENSITY: containment_count / (k * len(fake)),
        KEY_COVERAGE: float((real_to_nearest_fake_squared < real_radii_squared).mean()),
    }


def labels_to_class_fractions(labels: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """Count predicted labels per class and divide by the number of labels.

    Args:
        labels: Integer class labels of shape [n] with n >= 1 and values in
            [0, num_classes).
        num_classes: Number of classes, at least 1.

    Returns:
        Float64 array of shape [num_classes] that sums to 1.

    Raises:
        MetricInputError: If ``labels`` is empty.
        ValueError: If ``labels`` is not a 1-D integer array, a label is out of range or
            ``num_classes`` < 1.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}.")

    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"Mode coverage expects a 1-D integer array of labels, got shape "
            f"{labels.shape} and dtype {labels.dtype}."
        )
    if len(labels) < 1:
        raise MetricInputError("Mode coverage requires at least 1 label, got 0.")

    out_of_range = (labels < 0) | (labels >= num_classes)
    if out_of_range.any():
        raise ValueError(
            f"Labels must be in [0, {num_classes}), found {int(out_of_range.sum())} "
            f"outside, for example {int(labels[out_of_range][0])}."
        )

    counts = np.bincount(labels, minlength=num_classes)
    return counts / len(labels)


def class_fractions_to_entropy(class_fractions: np.ndarray) -> float:
    """Compute the Shannon entropy in nats of a class distribution.

    Args:
        class_fractions: Non-negative fractions of shape [num_classes] that sum to 1.

    Returns:
        The entropy, from 0 for a single class to ln(num_classes) for a uniform
        distribution.
    """
    class_fractions = np.asarray(class_fractions, dtype=np.float64)
    nonzero = class_fractions[class_fractions > 0]
    # p ln(1/p) rather than -p ln(p), which returns -0.0 for a single class.
    return float(np.sum(nonzero * np.log(1 / nonzero)))


def labels_to_mode_coverage(
    labels: np.ndarray, num_classes: int = 10, min_fraction: float = 0.01
) -> dict[str, float]:
    """Summarise how the evaluator's predicted labels spread over the classes.

    A class counts as a covered mode when at least ``min_fraction`` of the labels fall
    in it. Every value in the result is a scalar, so the dict can go to MLflow or a DVC
    metrics file as it is.

    Args:
        labels: Integer class labels of shape [n] with n >= 1 and values in
            [0, num_classes).
        num_classes: Number of classes, at least 1.
        min_fraction: Minimum fraction of labels for a class to count as a mode, in
            [0, 1].

    Returns:
        A dict with KEY_LABEL_ENTROPY (nats, at most ln(num_classes)), KEY_NUM_MODES
        (an int) and ``class_fraction_key(c)`` for every class c.

    Raises:
        MetricInputError: If ``labels`` is empty.
        ValueError: If the labels are invalid (see ``labels_to_class_fractions``) or
            ``min_fraction`` is outside [0, 1].
    """
    if not 0 <= min_fraction <= 1:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}.")

    class_fractions = labels_to_class_fractions(labels, num_classes)

    result: dict[str, float] = {
        KEY_LABEL_ENTROPY: class_fractions_to_entropy(class_fractions),
        KEY_NUM_MODES: int(np.sum(class_fractions >= min_fraction)),
    }
    for label, fraction in enumerate(class_fractions):
        result[class_fraction_key(label)] = float(fraction)
    return result


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Drop NaN and infinite values, logging a warning for each dropped key.

    NaN and infinity are not valid JSON numbers, so metrics pass through here before
    they are logged to MLflow or written to a DVC metrics file.

    Args:
        metrics: Metric names mapped to scalar numbers.

    Returns:
        A new dict with the finite entries, in the original order.

    Raises:
        TypeError: If a value is not a real number.
    """
    finite = {}
    for key, value in metrics.items():
        if not isinstance(value, numbers.Real):
            raise TypeError(
                f"Metric {key!r} has value {value!r} of type {type(value).__name__}, "
                "expected a real number."
            )
        if math.isfinite(value):
            finite[key] = value
        else:
            logger.warning("Dropping metric %r because its value %r is not finite.", key, value)
    return finite


def _validate_features(
    features: np.ndarray, metric: str, min_samples: int, name: str = "features"
) -> np.ndarray:
    """Convert features to a float64 array of shape [n, d] and check them for ``metric``."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] < 1:
        raise ValueError(
            f"{metric} expects {name} of shape [n, d] with d >= 1, got shape {features.shape}."
        )

    num_samples = features.shape[0]
    if num_samples < min_samples:
        raise MetricInputError(
            f"{metric} requires at least {min_samples} samples in {name}, got {num_samples}."
        )

    if not np.isfinite(features).all():
        bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
        raise ValueError(
            f"{metric} received NaN or infinite values in {name}, in {len(bad_rows)} of "
            f"{num_samples} rows (first row {bad_rows[0]}). Check the generator output "
            "and the evaluator."
        )
    return features


def _validate_same_dimension(a: np.ndarray, b: np.ndarray, metric: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{metric} inputs have different feature dimensions, {a.shape[1]} and "
            f"{b.shape[1]}. Extract both with the same evaluator layer."
        )


def _validate_statistics(
    mu: np.ndarray, sigma: np.ndarray, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Convert a mean and covariance to float64 and check their shapes and values."""
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"FID expects mu{name} of shape [d] and sigma{name} of shape [d, d], got "
            f"{mu.shape} and {sigma.shape}."
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"FID received NaN or infinite values in mu{name} or sigma{name}.")
    return mu, sigma


def _eigenvalues_to_real_roots(eigenvalues: np.ndarray, matrix_name: str) -> np.ndarray:
    """Take square roots of the eigenvalues of a symmetric PSD matrix, dropping rounding.

    Rounding leaves eigenvalues slightly below zero, whose square roots are small
    imaginary numbers. Those become 0, and larger ones raise.
    """
    largest_imaginary = math.sqrt(max(-float(eigenvalues.min()), 0.0))
    if largest_imaginary > _MAX_IMAGINARY_COMPONENT:
        raise ValueError(
            f"FID failed: {matrix_name} has eigenvalue {eigenvalues.min():.3g}, so its "
            f"square root has imaginary component {largest_imaginary:.3g} (maximum "
            f"{_MAX_IMAGINARY_COMPONENT}). Check that the covariances are positive "
            "semi-definite."
        )
    return np.sqrt(np.clip(eigenvalues, 0.0, None))


def _polynomial_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Compute the unbiased MMD^2 between two equal-size sets with a cubic kernel."""
    num_samples, dim = x.shape
    kernel_xx = (x @ x.T / dim + 1) ** 3
    kernel_yy = (y @ y.T / dim + 1) ** 3
    kernel_xy = (x @ y.T / dim + 1) ** 3

    # The within-set sums leave out the diagonal, the k(x_i, x_i) terms, which bias MMD^2.
    within_sum = kernel_xx.sum() - np.trace(kernel_xx) + kernel_yy.sum() - np.trace(kernel_yy)
    return float(
        within_sum / (num_samples * (num_samples - 1))
        - 2 * kernel_xy.sum() / num_samples**2
    )


def _squared_distance_blocks(
    rows: np.ndarray, columns: np.ndarray
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (start, stop, squared distances from rows[start:stop] to all columns).

    Uses ||x||^2 + ||y||^2 - 2 x.y, clipped at 0, in blocks of at most
    _MAX_DISTANCE_BLOCK_ENTRIES entries.
    """
    block_rows = max(1, _MAX_DISTANCE_BLOCK_ENTRIES // len(columns))
    row_norms = np.einsum("ij,ij->i", rows, rows)
    column_norms = np.einsum("ij,ij->i", columns, columns)

    for start in range(0, len(rows), block_rows):
        stop = min(start + block_rows, len(rows))
        block = rows[start:stop] @ columns.T
        block *= -2
        block += row_norms[start:stop, np.newaxis]
        block += column_norms[np.newaxis, :]
        np.maximum(block, 0.0, out=block)
        yield start, stop, block


def _kth_neighbour_squared_distances(features: np.ndarray, k: int) -> np.ndarray:
    """Return each sample's squared distance to its k-th nearest other sample.

    Each row of the distance block contains the sample's zero distance to itself, so
    the k-th smallest entry counting from 0 is the k-th nearest other sample.

    NOTE: A sample with k or more exact duplicates gets radius 0, so its open ball
    contains nothing, not even the duplicates.
    """
    radii_squared = np.empty(len(features))
    for start, stop, squared_distances in _squared_distance_blocks(features, features):
        radii_squared[start:stop] = np.partition(squared_distances, k, axis=1)[:, k]
    return radii_squared
