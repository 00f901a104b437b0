"""Stage finetune_control: train the GAN on real data for finetune.rounds * finetune.steps more updates.

The equal-compute baseline that fine-tuning must beat: the same checkpoint,
batch size, learning rate, latents and number of generator and discriminator
updates as the finetune stage, with a checkpoint at each round boundary. It
reads no rejection params, so threshold and method sweeps reuse it from the
cache.
"""

import logging

from rsft import paths
from rsft.finetuning import CONTROL, finetune_stage
from rsft.runtime import resolve_device, run_stage, seed_everything, write_json

logger = logging.getLogger("stages.finetune_control")


def main(params: dict) -> None:
    device = resolve_device(params["device"])
    seed_everything(params["finetune"]["seed"])
    metrics = finetune_stage(params, CONTROL, None, device, "finetune_control")
    write_json(paths.METRICS_DIR / "finetune_control.json", metrics)
    logger.info("control: %d more updates of normal GAN training", metrics["generator_updates"])


if __name__ == "__main__":
    run_stage("finetune_control", main)
