"""DCGAN generator and discriminator for 28x28x1 images, and the evaluator classifier."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as apply_spectral_norm


class Generator(nn.Module):
    """Map latent vectors [B, latent_dim] to images [B, 1, 28, 28] in [-1, 1]."""

    def __init__(self, latent_dim: int = 64, base_channels: int = 32) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        width = base_channels
        self.net = nn.Sequential(
            nn.Unflatten(1, (latent_dim, 1, 1)),
            nn.ConvTranspose2d(latent_dim, 4 * width, 7, 1, 0, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(True),
            # [B, 4w, 7, 7]
            nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(True),
            # [B, 2w, 14, 14]
            nn.ConvTranspose2d(2 * width, 1, 4, 2, 1),
            nn.Tanh(),
            # [B, 1, 28, 28]
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)


class Discriminator(nn.Module):
    """Map images [B, 1, 28, 28] to logits [B]; p(real) = sigmoid(logit)."""

    def __init__(self, base_channels: int = 32, spectral_norm: bool = False) -> None:
        super().__init__()
        width = base_channels

        def maybe_normalized(layer: nn.Module) -> nn.Module:
            return apply_spectral_norm(layer) if spectral_norm else layer

        # Batch normalization and spectral normalization are not combined: the
        # spectral-norm variant is the standard SNGAN-style discriminator.
        middle_norm: nn.Module = nn.Identity() if spectral_norm else nn.BatchNorm2d(4 * width)
        self.net = nn.Sequential(
            maybe_normalized(nn.Conv2d(1, 2 * width, 4, 2, 1)),
            nn.LeakyReLU(0.2, True),
            # [B, 2w, 14, 14]
            maybe_normalized(nn.Conv2d(2 * width, 4 * width, 4, 2, 1, bias=spectral_norm)),
            middle_norm,
            nn.LeakyReLU(0.2, True),
            # [B, 4w, 7, 7]
            nn.Flatten(),
            maybe_normalized(nn.Linear(4 * width * 7 * 7, 1)),
            # [B, 1]
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).squeeze(1)


class Evaluator(nn.Module):
    """Small CNN classifier; its penultimate activations are the metric features."""

    feature_dim = 128

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(True),
            nn.MaxPool2d(2),
            # [B, 32, 14, 14]
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(True),
            nn.MaxPool2d(2),
            # [B, 64, 7, 7]
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, self.feature_dim),
            nn.ReLU(True),
            # [B, 128]
        )
        self.classifier = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.feature_dim, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))
