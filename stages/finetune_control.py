"""Stage finetune_control: train the GAN on real data for exactly finetune.steps more updates.

The equal-compute baseline that fine-tuning must beat. It reads no rejection
params, so threshold sweeps reuse it from the cache.
"""

import logging

from rsft import paths
from rsft.finetuning import finetune_stage
from rsft.runtime import resolve_device, run_stage, seed_everything, write_json

logger = logging.getLogger("stages.finetune_control")


def main(params: dict) -> None:
    device = resolve_device(params["device"])
    seed_everything(params["finetune"]["seed"])
    metrics = finetune_stage(params, "control", None, device, "finetune_control")
    write_json(paths.METRICS_DIR / "finetune_control.json", metrics)


if __name__ == "__main__":
    run_stage("finetune_control", main)
