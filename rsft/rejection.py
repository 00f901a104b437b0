"""Rejection rules that decide which generated fakes are kept for fine-tuning.

Every rule takes 1-D numpy arrays of per-fake scores and returns a boolean mask,
True where the fake is kept. Scores are the discriminator's p = sigmoid(D(x)),
calibrated or raw, or its logits D(x) for Discriminator Rejection Sampling.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
from scipy.special import expit

from rsft.errors import RsftError

logger = logging.getLogger(__name__)

REJECTION_RULES = ("threshold", "quantile", "drs")

# Percentiles reported by p_quantiles(), keyed "p0", "p1", ..., "p100".
P_QUANTILE_PERCENTILES = (0, 1, 5, 25, 50, 75, 95, 99, 100)

# Percentile of p used as the suggested threshold when no fake passes, so that about
# 10% of the fakes would pass it.
SUGGESTED_THRESHOLD_PERCENTILE = 90


class NoFakesAcceptedError(RsftError, ValueError):
    """No fake passed the rejection rule, so there is nothing to fine-tune on."""


def accept_threshold(p: np.ndarray, threshold: float) -> np.ndarray:
    """Keep fakes whose p is strictly above the threshold.

    Args:
        p: 1-D probabilities of "real" in [0, 1].
        threshold: Threshold in [0, 1]. A fake with p equal to it is rejected, so
            threshold 1 rejects everything and threshold 0 rejects only p == 0.

    Returns:
        Boolean mask of the fakes kept.

    Raises:
        ValueError: If the threshold is outside [0, 1] or p is empty, NaN or outside [0, 1].
    """
    _validate_threshold(threshold)
    probabilities = _as_probabilities(p, "p")
    return probabilities > threshold


def accept_quantile(scores: np.ndarray, keep_fraction: float) -> np.ndarray:
    """Keep the top keep_fraction of fakes by score.

    The number kept is ceil(keep_fraction * n), and at least 1. Among equal scores
    the fake with the lower index is kept first, so the mask is deterministic.

    Args:
        scores: 1-D scores, higher meaning more realistic (p or logits).
        keep_fraction: Fraction of fakes to keep, in (0, 1].

    Returns:
        Boolean mask with exactly the computed number of True values.

    Raises:
        ValueError: If keep_fraction is outside (0, 1] or scores are empty or NaN.
    """
    if not _is_real_number(keep_fraction) or not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"Invalid keep_fraction {keep_fraction!r}; expected a number in (0, 1]")
    values = _as_scores(scores, "scores")

    # Rounding first stops float error from adding one, e.g. 0.1 * 30 = 3.0000000000000004.
    num_kept = max(1, math.ceil(round(keep_fraction * values.size, 9)))

    # A stable sort of the negated scores orders ties by increasing index.
    order = np.argsort(-values, kind="stable")
    mask = np.zeros(values.size, dtype=bool)
    mask[order[:num_kept]] = True
    return mask


def accept_drs(
    logits: np.ndarray,
    gamma_percentile: float,
    epsilon: float = 1e-6,
    seed: int = 0,
    max_logit: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep fakes by Discriminator Rejection Sampling (DRS).

    DRS is from Azadi et al., "Discriminator Rejection Sampling", ICLR 2019. With
    D_max the maximum logit, each fake gets
    F(x) = logit - D_max - log(1 - exp(logit - D_max - epsilon)),
    gamma is the gamma_percentile-th percentile of F over the fakes, and a fake is
    kept with probability sigmoid(F(x) - gamma).

    Args:
        logits: 1-D discriminator logits D(x) of the fakes.
        gamma_percentile: Percentile of F used as gamma, in [0, 100]. At 0 every
            acceptance probability is at least 0.5. Higher values keep fewer fakes.
        epsilon: Positive constant that keeps the log finite at logit == D_max.
        seed: Seed of the numpy Generator that draws the uniform numbers.
        max_logit: D_max estimated elsewhere, e.g. over a larger burn-in set. A logit
            above it raises D_max to that logit, because F is undefined for
            logit > D_max + epsilon.

    Returns:
        The boolean mask of kept fakes and the float64 acceptance probabilities.

    Raises:
        ValueError: If gamma_percentile is outside [0, 100], epsilon is not positive,
            max_logit is not finite, or the logits are empty, NaN or infinite.
    """
    if not _is_real_number(gamma_percentile) or not 0.0 <= gamma_percentile <= 100.0:
        raise ValueError(f"Invalid gamma_percentile {gamma_percentile!r}; expected a number in [0, 100]")
    if not _is_real_number(epsilon) or not (math.isfinite(epsilon) and epsilon > 0.0):
        raise ValueError(f"Invalid epsilon {epsilon!r}; expected a finite number > 0")
    if max_logit is not None and not (_is_real_number(max_logit) and math.isfinite(max_logit)):
        raise ValueError(f"Invalid max_logit {max_logit!r}; expected a finite number or None")

    values = _as_scores(logits, "logits")
    if not np.isfinite(values).all():
        raise ValueError(f"Invalid logits: {int((~np.isfinite(values)).sum())} are infinite")

    d_max = float(values.max())
    if max_logit is not None:
        if d_max > max_logit:
            logger.info("DRS: raised D_max from max_logit=%.6g to the largest logit %.6g", max_logit, d_max)
        d_max = max(d_max, float(max_logit))

    f_values = drs_f(values, d_max, epsilon)

    gamma = float(np.percentile(f_values, gamma_percentile))
    acceptance_probability = expit(f_values - gamma)

    rng = np.random.default_rng(seed)
    mask = rng.random(values.size) < acceptance_probability

    logger.info(
        "DRS: D_max=%.6g, gamma=%.6g at percentile %g, kept %d of %d fakes",
        d_max,
        gamma,
        gamma_percentile,
        int(mask.sum()),
        values.size,
    )
    return mask, acceptance_probability


def drs_f(logits: np.ndarray, max_logit: float, epsilon: float) -> np.ndarray:
    """Compute the DRS score F(x) = logit - D_max - log(1 - exp(logit - D_max - epsilon)).

    Logits must not exceed max_logit. DRS keeps a fake with probability
    sigmoid(F(x) - gamma).
    """
    # shifted <= -epsilon < 0, so -expm1(shifted) = 1 - exp(shifted) lies in (0, 1) and its log is finite.
    shifted = logits - max_logit - epsilon
    return logits - max_logit - np.log(-np.expm1(shifted))


def acceptance_curve(
    p_raw: np.ndarray,
    p_calibrated: np.ndarray | None,
    thresholds: np.ndarray | None = None,
) -> pd.DataFrame:
    """Compute the fraction of fakes with p > t for each threshold t.

    Args:
        p_raw: 1-D raw p = sigmoid(logit) of the fakes.
        p_calibrated: 1-D calibrated p of the same fakes, or None to omit its column.
        thresholds: Thresholds in [0, 1]. The default is 0.00, 0.01, ..., 1.00.

    Returns:
        One row per threshold with the columns threshold and acceptance_rate_raw, and
        acceptance_rate_calibrated when p_calibrated is given. Each rate is
        non-increasing in the threshold.

    Raises:
        ValueError: If a threshold is outside [0, 1] or p is empty, NaN or outside [0, 1].
    """
    if thresholds is None:
        threshold_values = np.round(np.arange(101) / 100.0, 2)
    else:
        threshold_values = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        for threshold in threshold_values:
            _validate_threshold(float(threshold))

    columns = {
        "threshold": threshold_values,
        "acceptance_rate_raw": _rates_above(_as_probabilities(p_raw, "p_raw"), threshold_values),
    }
    if p_calibrated is not None:
        calibrated = _as_probabilities(p_calibrated, "p_calibrated")
        columns["acceptance_rate_calibrated"] = _rates_above(calibrated, threshold_values)
    return pd.DataFrame(columns)


def _rates_above(p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Return the fraction of p strictly above each threshold, in O((n + m) log n)."""
    sorted_p = np.sort(p)
    num_at_or_below = np.searchsorted(sorted_p, thresholds, side="right")
    return (p.size - num_at_or_below) / p.size


def p_quantiles(p: np.ndarray) -> dict[str, float]:
    """Compute the percentiles of p listed in P_QUANTILE_PERCENTILES.

    Args:
        p: 1-D probabilities, non-empty and without NaN.

    Returns:
        Mapping from "p0", "p1", ..., "p100" to the percentile as a Python float,
        in increasing order of percentile. "p50" is the median.
    """
    values = _as_scores(p, "p")
    percentiles = np.percentile(values, P_QUANTILE_PERCENTILES)
    return {f"p{q}": float(value) for q, value in zip(P_QUANTILE_PERCENTILES, percentiles)}


def check_accepted(
    mask: np.ndarray,
    p: np.ndarray,
    threshold_description: str,
    threshold_param: str = "threshold",
    rule_param: str = "reject.rule",
) -> str | None:
    """Raise if no fake was kept, and warn if every fake was kept.

    Args:
        mask: Boolean mask returned by a rejection rule.
        p: The p values the rule was applied to, one per fake.
        threshold_description: The rule as the message shows it, such as
            "threshold=0.95 on calibrated p".
        threshold_param: Name of the threshold in params.yaml, used in the suggested command.
        rule_param: Name of the rule in params.yaml, used in the suggested command.

    Returns:
        A warning message, also logged, when every fake was kept, and None otherwise.

    Raises:
        NoFakesAcceptedError: If no fake was kept. The message gives the observed
            quantiles of p and a threshold that about 10% of the fakes would pass.
        ValueError: If mask and p differ in length or are empty.
    """
    accepted = np.asarray(mask, dtype=bool).reshape(-1)
    probabilities = _as_scores(p, "p")
    if accepted.size != probabilities.size:
        raise ValueError(f"Length mismatch: mask has {accepted.size} entries and p has {probabilities.size}")

    num_kept = int(accepted.sum())
    if num_kept == 0:
        message = _no_fakes_message(probabilities, threshold_description, threshold_param, rule_param)
        raise NoFakesAcceptedError(message)

    if num_kept == accepted.size:
        message = (
            f"All {accepted.size} fakes passed {threshold_description} (min p {probabilities.min():.3g}), "
            "so rejection filtered nothing and fine-tuning uses unfiltered fakes."
        )
        logger.warning(message)
        return message

    logger.info(
        "Kept %d of %d fakes (%.1f%%) with %s",
        num_kept,
        accepted.size,
        100.0 * num_kept / accepted.size,
        threshold_description,
    )
    return None


def _no_fakes_message(p: np.ndarray, threshold_description: str, threshold_param: str, rule_param: str) -> str:
    quantiles = p_quantiles(p)
    observed = (
        f"observed p: min {quantiles['p0']:.3g}, median {quantiles['p50']:.3g}, "
        f"99th percentile {quantiles['p99']:.3g}, max {quantiles['p100']:.3g}"
    )
    use_quantile = f"use {rule_param}=quantile"

    suggested = suggest_threshold(p)
    if suggested is None:
        return (
            f"No fake passed {threshold_description} ({observed}). "
            f"No threshold keeps a fake with p = 0, so {use_quantile}."
        )
    return (
        f"No fake passed {threshold_description} ({observed}). Lower the threshold, "
        f"e.g. `dvc exp run -S {threshold_param}={suggested:.2f}`, or {use_quantile}."
    )


def suggest_threshold(p: np.ndarray) -> float | None:
    """Suggest a two-decimal threshold that about 10% of the fakes pass.

    The suggestion is the largest multiple of 0.01 strictly below the 90th percentile
    of p, so every fake at or above that percentile passes it.

    Args:
        p: 1-D probabilities in [0, 1].

    Returns:
        The threshold, or None when no threshold in [0, 1] keeps any fake, which
        happens only when every p is 0.
    """
    values = _as_scores(p, "p")
    percentile = float(np.percentile(values, SUGGESTED_THRESHOLD_PERCENTILE))

    # Rounding first keeps 0.81 * 100 = 81.00000000000001 from ceiling to 82.
    hundredths = math.ceil(round(percentile * 100.0, 9)) - 1
    suggested = max(0.0, hundredths / 100.0)
    if not (values > suggested).any():
        return None
    return suggested


def _validate_threshold(threshold: float) -> None:
    if not _is_real_number(threshold) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"Invalid threshold {threshold!r}; expected a number in [0, 1]")


def _is_real_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _as_scores(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"Invalid {name}: expected a 1-D array, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"Invalid {name}: the array is empty")
    if np.isnan(array).any():
        raise ValueError(f"Invalid {name}: {int(np.isnan(array).sum())} of {array.size} values are NaN")
    return array


def _as_probabilities(values: np.ndarray, name: str) -> np.ndarray:
    array = _as_scores(values, name)
    if array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(
            f"Invalid {name}: values must lie in [0, 1], got min {array.min():.6g} and max {array.max():.6g}. "
            "Pass probabilities, not logits."
        )
    return array
