"""Training loops: the GAN (non-saturating loss, Adam) and the evaluator classifier."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from rsft.errors import TrainingDivergedError
from rsft.models import Discriminator, Evaluator, Generator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossRecord:
    """Mean losses over the `log_every` steps ending at `step`."""

    step: int
    loss_d: float
    loss_g: float


def make_adam(module: nn.Module, lr: float, beta1: float = 0.5) -> torch.optim.Adam:
    """Adam with the DCGAN betas (beta1, 0.999)."""
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(beta1, 0.999))


def shuffled_batches(
    images: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Yield batches of `images` forever, reshuffled every epoch with `generator`.

    The batch size is capped at the number of images; a final partial batch of
    one image is skipped because batch normalization needs two.
    """
    if len(images) < 2:
        raise ValueError(f"batches need at least 2 images, got {len(images)}")
    batch_size = min(batch_size, len(images))
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            index = order[start:start + batch_size]
            if len(index) >= 2:
                yield images[index]


# Maps the discriminator's logits of a batch of fakes [B] to the weights [B]
# of their generator loss terms; the finetune methods topk and weighted use it.
FakeWeights = Callable[[torch.Tensor], torch.Tensor]


def sample_latents(count: int, latent_dim: int, generator: torch.Generator) -> torch.Tensor:
    """Draw standard normal latents on the CPU so every device sees the same values."""
    return torch.randn(count, latent_dim, generator=generator)


def adversarial_step(
    generator: Generator,
    discriminator: Discriminator,
    optimizer_g: torch.optim.Optimizer,
    optimizer_d: torch.optim.Optimizer,
    real: torch.Tensor,
    latents: torch.Tensor,
    fake_weights: FakeWeights | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One discriminator update, then one generator update; return both losses.

    With `fake_weights`, the generator loss is the weighted mean of the
    per-fake losses (weights computed from the updated discriminator's logits,
    without gradient); a 0/1 weight applies the loss to the selected fakes only.
    """
    fakes = generator(latents)

    # Discriminator: maximize log D(x) + log(1 - D(G(z))).
    logits_real = discriminator(real)
    logits_fake = discriminator(fakes.detach())
    loss_d = (
        F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
        + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    )
    optimizer_d.zero_grad(set_to_none=True)
    loss_d.backward()
    optimizer_d.step()

    # Generator: maximize log D(G(z)), the non-saturating loss.
    logits_generated = discriminator(fakes)
    if fake_weights is None:
        loss_g = F.binary_cross_entropy_with_logits(logits_generated, torch.ones_like(logits_generated))
    else:
        weights = fake_weights(logits_generated.detach()).to(logits_generated)
        loss_g = weighted_generator_loss(logits_generated, weights)
    optimizer_g.zero_grad(set_to_none=True)
    loss_g.backward()
    optimizer_g.step()

    return loss_d.detach(), loss_g.detach()


def weighted_generator_loss(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the non-saturating generator loss -log D(G(z)) over a batch.

    Raises:
        ValueError: The weights are negative or sum to zero.
    """
    if bool((weights < 0).any()) or float(weights.sum()) <= 0.0:
        raise ValueError("generator loss weights must be non-negative with a positive sum")
    per_fake = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    return (weights * per_fake).sum() / weights.sum()


def train_adversarial(
    generator: Generator,
    discriminator: Discriminator,
    optimizer_g: torch.optim.Optimizer,
    optimizer_d: torch.optim.Optimizer,
    real_batches: Iterator[torch.Tensor],
    num_steps: int,
    latent_generator: torch.Generator,
    device: torch.device,
    log_every: int,
    first_step: int = 0,
    description: str = "GAN",
    fake_weights: FakeWeights | None = None,
) -> list[LossRecord]:
    """Run `num_steps` adversarial steps and return the loss records.

    Each step draws one batch from `real_batches` (the discriminator's "real"
    side) and as many latents. Losses are checked for NaN or infinity every
    `log_every` steps and at the last step. `fake_weights` is passed to
    adversarial_step.

    Raises:
        TrainingDivergedError: A loss became NaN or infinite.
    """
    generator.train()
    discriminator.train()
    records: list[LossRecord] = []
    sum_d = torch.zeros((), device=device)
    sum_g = torch.zeros((), device=device)
    count = 0

    for step in tqdm(range(first_step + 1, first_step + num_steps + 1), desc=description, leave=False, disable=None):
        real = next(real_batches).to(device)
        latents = sample_latents(len(real), generator.latent_dim, latent_generator).to(device)
        loss_d, loss_g = adversarial_step(
            generator, discriminator, optimizer_g, optimizer_d, real, latents, fake_weights
        )
        sum_d += loss_d
        sum_g += loss_g
        count += 1

        if count == log_every or step == first_step + num_steps:
            record = LossRecord(step, sum_d.item() / count, sum_g.item() / count)
            check_finite(record)
            check_finite_weights(record.step, generator, discriminator)
            records.append(record)
            sum_d.zero_()
            sum_g.zero_()
            count = 0

    return records


def check_finite(record: LossRecord) -> None:
    """Stop training when a loss is NaN or infinite, before anything is saved."""
    for name, value in (("discriminator", record.loss_d), ("generator", record.loss_g)):
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"{name} loss became {value} by step {record.step}; training stopped and no "
                f"checkpoint was written. Lower the learning rate (e.g. halve train_gan.lr or "
                f"finetune.lr) or enable train_gan.spectral_norm."
            )


def check_finite_weights(step: int, *models: nn.Module) -> None:
    """Stop training when a weight or buffer is NaN or infinite.

    Losses can stay finite while, for one, batch normalization's running
    variance overflows; the generator in eval mode would then produce garbage.
    """
    for model in models:
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise TrainingDivergedError(
                    f"{type(model).__name__.lower()} {name} became NaN or infinite by step {step}; training "
                    f"stopped and no checkpoint was written. Lower the learning rate (e.g. halve train_gan.lr "
                    f"or finetune.lr) or enable train_gan.spectral_norm."
                )


def train_evaluator(
    evaluator: Evaluator,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    device: torch.device,
) -> list[float]:
    """Train the classifier with Adam and cross-entropy; return the loss per epoch."""
    optimizer = torch.optim.Adam(evaluator.parameters(), lr=lr)
    batch_size = min(batch_size, len(images))
    steps_per_epoch = math.ceil(len(images) / batch_size)
    batches = shuffled_batches(torch.arange(len(images)), batch_size, generator)
    evaluator.train()
    epoch_losses = []

    for epoch in range(epochs):
        total = torch.zeros((), device=device)
        for _ in tqdm(range(steps_per_epoch), desc=f"evaluator epoch {epoch + 1}", leave=False, disable=None):
            index = next(batches)
            logits = evaluator(images[index].to(device))
            loss = F.cross_entropy(logits, labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        epoch_losses.append(total.item() / steps_per_epoch)
        logger.info("evaluator epoch %d: loss %.4f", epoch + 1, epoch_losses[-1])

    evaluator.eval()
    return epoch_losses


@torch.no_grad()
def predict_in_batches(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Run `model` in eval mode over `images` batch by batch; return CPU outputs."""
    model.eval()
    outputs = [model(images[start:start + batch_size].to(device)).cpu() for start in range(0, len(images), batch_size)]
    return torch.cat(outputs)
