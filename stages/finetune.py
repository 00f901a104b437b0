"""Stage finetune: fine-tune the trained generator on the kept fakes (finetune.method)."""

import logging

import numpy as np

from rsft import paths
from rsft.finetuning import finetune_stage
from rsft.runtime import resolve_device, run_stage, seed_everything, write_json

logger = logging.getLogger("stages.finetune")


def main(params: dict) -> None:
    device = resolve_device(params["device"])
    seed_everything(params["finetune"]["seed"])
    with np.load(paths.KEPT, allow_pickle=False) as kept:
        kept_images = kept["images"]
    metrics = finetune_stage(params, params["finetune"]["method"], kept_images, device, "finetune")
    write_json(paths.METRICS_DIR / "finetune.json", metrics)
    logger.info("fine-tuned on %d kept fakes for %d steps", metrics["num_kept"], metrics["steps"])


if __name__ == "__main__":
    run_stage("finetune", main)
