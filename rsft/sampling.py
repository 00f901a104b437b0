"""Generate fakes from a generator and score images with a discriminator."""

from __future__ import annotations

import numpy as np
import torch

from rsft.data import images_to_tensor_range, tensor_range_to_images
from rsft.models import Discriminator, Generator


@torch.no_grad()
def generate_images(
    generator: Generator, latents: torch.Tensor, batch_size: int, device: torch.device
) -> np.ndarray:
    """Generate uint8 images [n, 28, 28] from latents [n, latent_dim], in eval mode.

    Fakes are quantized to uint8 like real images, so the discriminator and
    the evaluator see fakes and reals in the same format.
    """
    generator.eval()
    chunks = []
    for start in range(0, len(latents), batch_size):
        values = generator(latents[start:start + batch_size].to(device)).cpu().numpy()
        chunks.append(tensor_range_to_images(values))
    return np.concatenate(chunks) if chunks else np.zeros((0, 28, 28), np.uint8)


@torch.no_grad()
def discriminator_logits(
    discriminator: Discriminator, images: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    """Return the discriminator's logits (float64 [n]) for uint8 images [n, 28, 28]."""
    discriminator.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images_to_tensor_range(images[start:start + batch_size])).to(device)
        chunks.append(discriminator(batch).double().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros(0)
