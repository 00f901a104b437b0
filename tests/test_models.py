"""Model shapes and training health: NaN or infinite losses stop training within one logging interval."""

import itertools

import pytest
import torch

from rsft.errors import TrainingDivergedError
from rsft.models import Discriminator, Evaluator, Generator
from rsft.training import make_adam, shuffled_batches, train_adversarial

CPU = torch.device("cpu")
LOG_EVERY = 4


def test_generator_shape():
    images = Generator(latent_dim=8, base_channels=4)(torch.randn(3, 8))
    assert images.shape == (3, 1, 28, 28)


def test_discriminator_shape():
    assert Discriminator(base_channels=4, spectral_norm=True)(torch.zeros(3, 1, 28, 28)).shape == (3,)


def test_evaluator_shape():
    assert Evaluator()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def poisoned_batches(first_bad: int, value: float, counter: list):
    """Yield real-looking batches, then batches full of `value` from batch number `first_bad` on."""
    for number in itertools.count(1):
        counter.append(number)
        batch = torch.rand(8, 1, 28, 28) * 2 - 1
        yield batch if number < first_bad else torch.full_like(batch, value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_within_interval(value):
    torch.manual_seed(0)
    generator, discriminator = Generator(8, 4), Discriminator(4)
    consumed: list = []
    with pytest.raises(TrainingDivergedError) as raised:
        train_adversarial(
            generator, discriminator, make_adam(generator, 2e-4), make_adam(discriminator, 2e-4),
            poisoned_batches(6, value, consumed), num_steps=40, latent_generator=torch.Generator().manual_seed(0),
            device=CPU, log_every=LOG_EVERY,
        )
    # The first bad batch is step 6, so the check at step 8 must stop training.
    assert len(consumed) == 8
    message = str(raised.value)
    assert "discriminator loss became nan by step 8" in message
    assert "Lower the learning rate" in message


def test_single_image_cannot_batch():
    with pytest.raises(ValueError, match="at least 2 images"):
        next(shuffled_batches(torch.zeros(1, 1, 28, 28), 4, torch.Generator()))


def test_exploding_weights_stop_training():
    # At lr 1e8 the losses can stay finite while batch normalization's running variance overflows.
    torch.manual_seed(0)
    generator, discriminator = Generator(8, 4), Discriminator(4)
    consumed: list = []
    with pytest.raises(TrainingDivergedError) as raised:
        train_adversarial(
            generator, discriminator, make_adam(generator, 1e8), make_adam(discriminator, 1e8),
            poisoned_batches(10**9, 0.0, consumed), num_steps=40, latent_generator=torch.Generator().manual_seed(0),
            device=CPU, log_every=LOG_EVERY,
        )
    assert len(consumed) == LOG_EVERY
    assert f"running_var became NaN or infinite by step {LOG_EVERY}" in str(raised.value)
