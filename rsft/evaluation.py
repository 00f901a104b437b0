"""Evaluation of sample sets against the real test split in the evaluator's feature space."""

from __future__ import annotations

import logging

import numpy as np
import torch

from rsft import metrics
from rsft.acceptance import FittedRule
from rsft.calibration import Calibrator
from rsft.data import NUM_CLASSES, images_to_tensor_range
from rsft.models import Discriminator, Evaluator, Generator
from rsft.sampling import discriminator_logits, generate_images
from rsft.training import sample_latents

logger = logging.getLogger(__name__)

# Evaluated sample sets, in the order reports list them. "real" is the floor:
# real training images against the real test split.
SET_NAMES = ("real", "baseline", "rejection", "finetuned", "control")
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PRDC_K = 5


@torch.no_grad()
def images_to_features(
    evaluator: Evaluator, images: np.ndarray, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Return evaluator features (float64 [n, 128]) and predicted labels ([n]) of uint8 images."""
    evaluator.eval()
    features, labels = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images_to_tensor_range(images[start:start + batch_size])).to(device)
        hidden = evaluator.features(batch)
        features.append(hidden.double().cpu().numpy())
        labels.append(evaluator.classifier(hidden).argmax(dim=1).cpu().numpy())
    return np.concatenate(features), np.concatenate(labels)


def features_to_set_metrics(
    reference: np.ndarray, features: np.ndarray, labels: np.ndarray, seed: int
) -> dict[str, float]:
    """Compute every metric of one sample set against the reference (test) features.

    Returns:
        fid, kid_mean, kid_std, precision, recall, density, coverage,
        label_entropy, num_modes and class_fraction_<k> for each class.
    """
    result = {metrics.KEY_FID: metrics.features_to_fid(reference, features)}
    kid_mean, kid_std = metrics.features_to_kid(reference, features, KID_SUBSETS, KID_SUBSET_SIZE, seed)
    result[metrics.KEY_KID_MEAN] = kid_mean
    result[metrics.KEY_KID_STD] = kid_std
    result.update(metrics.features_to_prdc(reference, features, k=PRDC_K))
    result.update(metrics.labels_to_mode_coverage(labels, NUM_CLASSES))
    return result


def sample_with_rejection(
    generator: Generator,
    discriminator: Discriminator,
    rule: FittedRule,
    calibrator: Calibrator,
    count: int,
    max_draws: int,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> tuple[np.ndarray, int]:
    """Draw fakes and keep those the fitted rule accepts until `count` are kept.

    Returns:
        (kept uint8 images, at most `count` of them; number of fakes drawn).
        Fewer than `count` images come back when `max_draws` is reached.
    """
    latent_random = torch.Generator().manual_seed(seed)
    decision_random = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    num_kept = 0
    num_drawn = 0
    while num_kept < count and num_drawn < max_draws:
        size = min(batch_size, max_draws - num_drawn)
        images = generate_images(generator, sample_latents(size, generator.latent_dim, latent_random), size, device)
        logits = discriminator_logits(discriminator, images, size, device)
        accepted = rule.accept(logits, calibrator, decision_random)
        kept.append(images[accepted])
        num_kept += int(accepted.sum())
        num_drawn += size
    images = np.concatenate(kept)[:count] if kept else np.zeros((0, 28, 28), np.uint8)
    return images, num_drawn


def per_class_examples(images: np.ndarray, labels: np.ndarray, per_class: int = 10) -> np.ndarray:
    """Up to `per_class` images of each predicted class, one row per class (blank where missing)."""
    rows = []
    for label in range(NUM_CLASSES):
        row = images[labels == label][:per_class]
        blank = np.full((per_class - len(row), *images.shape[1:]), 255, np.uint8)
        rows.append(np.concatenate([row, blank]))
    return np.concatenate(rows)
