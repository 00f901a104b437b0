"""Stage score: discriminator logits, raw p and calibrated p for every fake.

Does not read `threshold`, so a threshold sweep reuses this stage from the cache.
The calibrator is fit on one half of (validation reals, fresh fakes) and its
quality is measured on the other half.
"""

import json
import logging

import numpy as np
import pandas as pd
import torch
from scipy.special import expit

from rsft import calibration, data, paths, rejection
from rsft.checkpoint import load_gan
from rsft.errors import RsftError
from rsft.runtime import atomic_path, resolve_device, run_stage, seed_everything, stream_seed, write_json
from rsft.sampling import discriminator_logits, generate_images
from rsft.training import sample_latents

logger = logging.getLogger("stages.score")


def _write_csv(frame: pd.DataFrame, path) -> None:
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)


def main(params: dict) -> None:
    config = params["score"]
    batch_size = params["generate"]["batch_size"]
    device = resolve_device(params["device"])
    seed_everything(params["seed"])
    generator, discriminator, _ = load_gan(paths.GAN_CHECKPOINT, device)

    with np.load(paths.FAKES, allow_pickle=False) as fakes:
        images, sample_id = fakes["images"], fakes["sample_id"]
    logits = discriminator_logits(discriminator, images, batch_size, device)

    # Calibration set: held-out reals vs fresh fakes (never the scored ones), half to fit, half to measure.
    validation = data.load_split(paths.VALIDATION_SPLIT)
    count = min(config["num_calibration"], len(validation))
    random = torch.Generator().manual_seed(stream_seed(params["seed"], "calibration"))
    fresh = generate_images(generator, sample_latents(count, generator.latent_dim, random), batch_size, device)
    logits_real = discriminator_logits(discriminator, validation.images[:count], batch_size, device)
    logits_fresh = discriminator_logits(discriminator, fresh, batch_size, device)
    half = count // 2
    try:
        calibrator = calibration.fit_calibrator(config["calibration"], logits_real[:half], logits_fresh[:half])
    except ValueError as error:
        raise RsftError(f"calibration failed: {error}. Raise score.num_calibration or data.validation_size") from None

    held_logits = np.concatenate([logits_real[half:], logits_fresh[half:]])
    held_labels = np.concatenate([np.ones(count - half), np.zeros(count - half)])
    p_raw_fakes = expit(logits)
    p_calibrated_fakes = calibrator.predict(logits)
    quality = {}
    for name, p_held in (("raw", expit(held_logits)), ("calibrated", calibrator.predict(held_logits))):
        quality[f"brier_{name}"] = calibration.brier_score(p_held, held_labels)
        quality[f"ece_{name}"] = calibration.expected_calibration_error(p_held, held_labels)
        _write_csv(calibration.reliability_table(p_held, held_labels), paths.PLOTS_DIR / "score" / f"reliability_{name}.csv")

    with atomic_path(paths.SCORES_DIR) as directory:
        directory.mkdir()
        pd.DataFrame({
            "sample_id": sample_id, "logit": logits, "p_raw": p_raw_fakes, "p_calibrated": p_calibrated_fakes,
        }).to_parquet(directory / paths.SCORES.name, index=False)
        pd.DataFrame({
            "label": np.where(held_labels == 1, "real", "fake"), "logit": held_logits,
            "p_raw": expit(held_logits), "p_calibrated": calibrator.predict(held_logits),
        }).to_parquet(directory / "held_out.parquet", index=False)
        (directory / paths.CALIBRATOR.name).write_text(json.dumps(calibrator.to_dict(), indent=2, sort_keys=True) + "\n")

    _write_csv(rejection.acceptance_curve(p_raw_fakes, p_calibrated_fakes), paths.PLOTS_DIR / "score" / "acceptance_curve.csv")
    metrics = {"calibration": config["calibration"], **quality}
    metrics.update({f"raw_{key}": value for key, value in rejection.p_quantiles(p_raw_fakes).items()})
    metrics.update({f"calibrated_{key}": value for key, value in rejection.p_quantiles(p_calibrated_fakes).items()})
    write_json(paths.METRICS_DIR / "score.json", metrics)
    logger.info(
        "raw p of fakes in [%.3f, %.3f]; ECE raw %.3f, calibrated %.3f",
        p_raw_fakes.min(), p_raw_fakes.max(), quality["ece_raw"], quality["ece_calibrated"],
    )


if __name__ == "__main__":
    run_stage("score", main)
