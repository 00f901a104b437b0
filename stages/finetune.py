"""Stage finetune: fine-tune the trained GAN on the kept fakes by finetune.method, for finetune.rounds rounds.

Writes data/finetune/checkpoint.pt (the last round) and round_<k>/ for every
round; see rsft/finetuning.py for the methods and what a round stores.
"""

import logging

import numpy as np
import pandas as pd

from rsft import paths
from rsft.calibration import Calibrator
from rsft.finetuning import RoundInput, finetune_stage
from rsft.runtime import read_json, resolve_device, run_stage, seed_everything, write_json

logger = logging.getLogger("stages.finetune")


def main(params: dict) -> None:
    device = resolve_device(params["device"])
    seed_everything(params["finetune"]["seed"])
    with np.load(paths.KEPT, allow_pickle=False) as kept:
        kept_images = kept["images"]
    accepted = pd.read_parquet(paths.DECISIONS)["accepted"].to_numpy()
    first_round = RoundInput(
        kept_images=kept_images,
        acceptance_rate=float(accepted.mean()),
        calibrator=Calibrator.from_dict(read_json(paths.CALIBRATOR)),
        threshold=params["threshold"] if params["reject"]["rule"] == "threshold" else None,
        num_scored=len(accepted),
    )

    metrics = finetune_stage(params, params["finetune"]["method"], first_round, device, "finetune")
    write_json(paths.METRICS_DIR / "finetune.json", metrics)
    # Only adversarial and mixed train on the kept fakes; topk takes k from their share, weighted ignores them.
    logger.info(
        "fine-tuned by %s for %d round(s) of %d steps; the first round's rule kept %d of %d fakes",
        metrics["method"], metrics["rounds"], metrics["steps"], metrics["num_kept"], first_round.num_scored,
    )


if __name__ == "__main__":
    run_stage("finetune", main)
