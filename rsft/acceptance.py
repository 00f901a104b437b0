"""Rejection rules fitted on the scored fakes and reapplied to new fakes.

The reject stage decides on a fixed set of scored fakes. Evaluation and
fine-tuning rounds need the same decision for fresh fakes, so each rule is
reduced to a small JSON-serializable state: a probability threshold, a logit
cutoff (quantile) or the DRS constants D_max and gamma.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import expit

from rsft import rejection
from rsft.calibration import Calibrator


@dataclass(frozen=True)
class Decisions:
    """Result of applying a rule to scored fakes."""

    accepted: np.ndarray
    acceptance_probability: np.ndarray
    rule: "FittedRule"


@dataclass(frozen=True)
class FittedRule:
    """Rule state that reproduces the reject stage's decision on new fakes.

    Attributes:
        rule: threshold, quantile or drs.
        threshold: threshold rule; keep calibrated p > threshold.
        logit_cutoff: quantile rule; keep logit >= cutoff (the lowest kept logit).
        max_logit, gamma, epsilon: drs rule constants.
    """

    rule: str
    threshold: float | None = None
    logit_cutoff: float | None = None
    max_logit: float | None = None
    gamma: float | None = None
    epsilon: float | None = None

    def acceptance_probability(self, logits: np.ndarray, calibrator: Calibrator) -> np.ndarray:
        """Probability of keeping each fake (0 or 1 except for drs)."""
        if self.rule == "threshold":
            return (calibrator.predict(logits) > self.threshold).astype(np.float64)
        if self.rule == "quantile":
            return (logits >= self.logit_cutoff).astype(np.float64)
        clipped = np.minimum(logits, self.max_logit)
        return expit(rejection.drs_f(clipped, self.max_logit, self.epsilon) - self.gamma)

    def accept(self, logits: np.ndarray, calibrator: Calibrator, random: np.random.Generator) -> np.ndarray:
        """Boolean mask of kept fakes; drs draws with `random`."""
        probability = self.acceptance_probability(logits, calibrator)
        if self.rule == "drs":
            return random.random(len(logits)) < probability
        return probability > 0.5

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FittedRule":
        return cls(**data)


def decide(
    rule: str,
    logits: np.ndarray,
    p_calibrated: np.ndarray,
    reject_params: dict[str, Any],
    threshold: float,
    seed: int,
) -> Decisions:
    """Apply the configured rule to scored fakes.

    Args:
        rule: threshold, quantile or drs.
        logits: Discriminator logits of the fakes.
        p_calibrated: Calibrated p of the fakes (raw p when calibration is none).
        reject_params: The `reject` params group.
        threshold: The top-level `threshold` param.
        seed: Seed of the DRS draws.

    Returns:
        The decisions and the fitted rule.
    """
    if rule == "threshold":
        accepted = rejection.accept_threshold(p_calibrated, threshold)
        return Decisions(accepted, accepted.astype(np.float64), FittedRule("threshold", threshold=threshold))

    if rule == "quantile":
        # Ranking by logit gives the order of calibrated p without the ties
        # that isotonic calibration creates.
        accepted = rejection.accept_quantile(logits, reject_params["keep_fraction"])
        cutoff = float(logits[accepted].min())
        return Decisions(accepted, accepted.astype(np.float64), FittedRule("quantile", logit_cutoff=cutoff))

    epsilon = reject_params["drs_epsilon"]
    accepted, probability = rejection.accept_drs(
        logits, reject_params["drs_gamma_percentile"], epsilon=epsilon, seed=seed
    )
    max_logit = float(logits.max())
    gamma = float(np.percentile(rejection.drs_f(logits, max_logit, epsilon), reject_params["drs_gamma_percentile"]))
    fitted = FittedRule("drs", max_logit=max_logit, gamma=gamma, epsilon=epsilon)
    return Decisions(accepted, probability, fitted)
