"""Stage generate: draw generate.num_samples fakes and their latents from the trained generator."""

import logging

import numpy as np
import torch

from rsft import paths
from rsft.checkpoint import load_gan
from rsft.runtime import atomic_path, resolve_device, run_stage, seed_everything, stream_seed
from rsft.sampling import generate_images
from rsft.training import sample_latents

logger = logging.getLogger("stages.generate")


def main(params: dict) -> None:
    config = params["generate"]
    device = resolve_device(params["device"])
    seed_everything(params["seed"])
    generator, _, _ = load_gan(paths.GAN_CHECKPOINT, device)

    random = torch.Generator().manual_seed(stream_seed(params["seed"], "generate"))
    latents = sample_latents(config["num_samples"], generator.latent_dim, random)
    images = generate_images(generator, latents, config["batch_size"], device)

    with atomic_path(paths.FAKES) as temporary:
        with open(temporary, "wb") as stream:
            np.savez(stream, images=images, latents=latents.numpy(), sample_id=np.arange(len(images)))
    logger.info("wrote %d fakes to %s", len(images), paths.FAKES)


if __name__ == "__main__":
    run_stage("generate", main)
