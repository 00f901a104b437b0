"""Stage train_gan: train a DCGAN on the training split; save checkpoint, loss curve and samples."""

import logging

import pandas as pd
import torch

from rsft import data, paths
from rsft.checkpoint import gan_state, save_checkpoint
from rsft.images import save_grid
from rsft.models import Discriminator, Generator
from rsft.runtime import atomic_path, resolve_device, run_stage, seed_everything, write_json
from rsft.sampling import generate_images
from rsft.training import make_adam, sample_latents, shuffled_batches, train_adversarial

logger = logging.getLogger("stages.train_gan")


def main(params: dict) -> None:
    config = params["train_gan"]
    device = resolve_device(params["device"])
    random = seed_everything(params["seed"])

    train = data.load_split(paths.TRAIN_SPLIT)
    images = torch.from_numpy(data.images_to_tensor_range(train.images))
    batch_size = min(config["batch_size"], len(images))
    steps_per_epoch = max(1, len(images) // batch_size)
    num_steps = config["epochs"] * steps_per_epoch

    generator = Generator(config["latent_dim"], config["base_channels"]).to(device)
    discriminator = Discriminator(config["base_channels"], config["spectral_norm"]).to(device)
    optimizer_g = make_adam(generator, config["lr"], config["beta1"])
    optimizer_d = make_adam(discriminator, config["lr"], config["beta1"])
    logger.info("training for %d steps (%d epochs of %d images)", num_steps, config["epochs"], len(images))

    records = train_adversarial(
        generator, discriminator, optimizer_g, optimizer_d,
        shuffled_batches(images, batch_size, random), num_steps, random, device, config["log_every"],
    )

    model_config = {key: config[key] for key in ("latent_dim", "base_channels", "spectral_norm")}
    state = gan_state(generator, discriminator, optimizer_g, optimizer_d, model_config, num_steps)

    preview_latents = sample_latents(100, config["latent_dim"], torch.Generator().manual_seed(params["seed"]))
    # The whole output directory appears at once, so a killed run leaves no partial data/gan.
    with atomic_path(paths.GAN_DIR) as directory:
        directory.mkdir()
        save_checkpoint(state, directory / paths.GAN_CHECKPOINT.name)
        save_grid(generate_images(generator, preview_latents, 100, device), directory / paths.GAN_SAMPLES.name)

    losses = pd.DataFrame([record.__dict__ for record in records])
    with atomic_path(paths.PLOTS_DIR / "train_gan" / "losses.csv") as temporary:
        losses.to_csv(temporary, index=False)
    write_json(paths.METRICS_DIR / "train_gan.json", {
        "steps": num_steps, "final_loss_d": records[-1].loss_d, "final_loss_g": records[-1].loss_g,
    })


if __name__ == "__main__":
    run_stage("train_gan", main)
