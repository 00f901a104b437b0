"""Fine-tuning the generator on kept fakes, and the equal-compute control.

Every method continues adversarial training from the trained GAN, optimizer
state included, for `finetune.steps` generator and discriminator updates of
`finetune.batch_size` each. Methods differ only in what the discriminator
sees as its "real" side:

- adversarial: kept fakes only; the generator is pulled towards the kept set.
- mixed: a fraction `real_fraction` of real images, the rest kept fakes.
- control (the finetune_control stage): real images only, i.e. simply training
  the GAN longer for the same compute.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

from rsft.checkpoint import gan_state
from rsft.models import Discriminator, Generator
from rsft import data, paths
from rsft.checkpoint import load_gan, save_checkpoint
from rsft.runtime import atomic_path, stream_seed
from rsft.training import LossRecord, make_adam, train_adversarial

logger = logging.getLogger(__name__)


def real_fraction_for(method: str, real_fraction: float) -> float:
    """Fraction of real images on the discriminator's real side for a method."""
    return {"adversarial": 0.0, "mixed": real_fraction, "control": 1.0}[method]


def mixed_batches(
    real: torch.Tensor, kept: torch.Tensor, real_fraction: float, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Yield batches with round(real_fraction * batch_size) real images, the rest kept fakes."""
    num_real = round(real_fraction * batch_size)
    num_kept = batch_size - num_real
    real_stream = _stream(real, num_real, generator)
    kept_stream = _stream(kept, num_kept, generator)
    while True:
        parts = [next(stream) for stream in (real_stream, kept_stream) if stream is not None]
        yield torch.cat(parts)


def _stream(images: torch.Tensor, count: int, generator: torch.Generator) -> Iterator[torch.Tensor] | None:
    """Yield `count` images at a time, reshuffled each pass; repeats when images are fewer."""
    if count == 0:
        return None

    def batches() -> Iterator[torch.Tensor]:
        while True:
            order = torch.randperm(len(images), generator=generator)
            while len(order) < count:
                order = torch.cat([order, torch.randperm(len(images), generator=generator)])
            for start in range(0, len(order) - count + 1, count):
                yield images[order[start:start + count]]

    return batches()


def continue_training(
    generator: Generator,
    discriminator: Discriminator,
    state: dict[str, Any],
    real_side: Iterator[torch.Tensor],
    steps: int,
    lr: float,
    random: torch.Generator,
    device: torch.device,
    log_every: int,
    description: str,
) -> tuple[dict[str, Any], list[LossRecord]]:
    """Continue adversarial training from a checkpoint state; return the new state and losses."""
    beta1 = state["optimizer_g"]["param_groups"][0]["betas"][0]
    optimizer_g = make_adam(generator, lr, beta1)
    optimizer_d = make_adam(discriminator, lr, beta1)
    optimizer_g.load_state_dict(state["optimizer_g"])
    optimizer_d.load_state_dict(state["optimizer_d"])
    for optimizer in (optimizer_g, optimizer_d):
        for group in optimizer.param_groups:
            group["lr"] = lr

    first_step = int(state["step"])
    records = train_adversarial(
        generator, discriminator, optimizer_g, optimizer_d, real_side, steps, random, device, log_every,
        first_step=first_step, description=description,
    )
    new_state = gan_state(generator, discriminator, optimizer_g, optimizer_d, state["config"], first_step + steps)
    return new_state, records



def finetune_stage(
    params: dict[str, Any], method: str, kept_images: np.ndarray | None, device: torch.device, name: str
) -> dict[str, float]:
    """Fine-tune the trained GAN by `method` and write data/<name>/checkpoint.pt and its loss plot.

    Args:
        params: Validated params.
        method: adversarial, mixed or control.
        kept_images: uint8 kept fakes [n, 28, 28]; None for the control.
        device: Where to train.
        name: Stage name; selects the output paths.

    Returns:
        Metrics of the run: steps, final losses, number of kept fakes used.
    """
    config = params["finetune"]
    generator, discriminator, state = load_gan(paths.GAN_CHECKPOINT, device)
    real = torch.from_numpy(data.images_to_tensor_range(data.load_split(paths.TRAIN_SPLIT).images))
    kept = torch.from_numpy(data.images_to_tensor_range(kept_images)) if kept_images is not None else None

    # The control uses the same seed as the methods, so both draw the same latents.
    random = torch.Generator().manual_seed(stream_seed(config["seed"], "finetune"))
    fraction = real_fraction_for(method, config["real_fraction"])
    real_side = mixed_batches(real, kept if kept is not None else real[:0], fraction, config["batch_size"], random)
    new_state, records = continue_training(
        generator, discriminator, state, real_side, config["steps"], config["lr"], random, device,
        params["train_gan"]["log_every"], description=name,
    )

    save_checkpoint(new_state, paths.GAN_CHECKPOINT.parents[1] / name / "checkpoint.pt")
    losses = pd.DataFrame([record.__dict__ for record in records])
    with atomic_path(paths.PLOTS_DIR / name / "losses.csv") as temporary:
        losses.to_csv(temporary, index=False)
    return {
        "method": method,
        "steps": config["steps"],
        "num_kept": 0 if kept is None else len(kept),
        "final_loss_d": records[-1].loss_d,
        "final_loss_g": records[-1].loss_g,
    }
