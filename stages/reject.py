"""Stage reject: keep the fakes that pass reject.rule; write the kept set, decisions and the fitted rule."""

import json
import logging

import numpy as np
import pandas as pd

from rsft import paths, plots
from rsft.acceptance import decide
from rsft.images import save_grid
from rsft.rejection import accept_threshold, check_accepted
from rsft.runtime import atomic_path, run_stage, stream_seed, write_json

logger = logging.getLogger("stages.reject")

EXAMPLES_PER_ROW = 10


def _examples(images: np.ndarray, logits: np.ndarray, accepted: np.ndarray) -> np.ndarray:
    """Rows of the best, borderline (lowest kept, highest rejected) and worst fakes by logit."""
    order = np.argsort(-logits, kind="stable")
    kept_order = order[accepted[order]]
    rejected_order = order[~accepted[order]]
    rows = [order[:EXAMPLES_PER_ROW], kept_order[-EXAMPLES_PER_ROW:], rejected_order[:EXAMPLES_PER_ROW],
            order[-EXAMPLES_PER_ROW:]]
    return np.concatenate([images[row] for row in rows if len(row)])


def main(params: dict) -> None:
    config = params["reject"]
    threshold = params["threshold"]
    scores = pd.read_parquet(paths.SCORES)
    held_out = pd.read_parquet(paths.SCORES_DIR / "held_out.parquet")
    logits = scores["logit"].to_numpy()
    p = scores["p_calibrated"].to_numpy()
    calibrated = params["score"]["calibration"] != "none"
    p_name = "calibrated p" if calibrated else "raw p"

    decisions = decide(config["rule"], logits, p, config, threshold, stream_seed(params["seed"], "drs"))
    accepted = decisions.accepted
    description = {
        "threshold": f"threshold={threshold:g} on {p_name}",
        "quantile": f"reject.keep_fraction={config['keep_fraction']:g}",
        "drs": f"reject.drs_gamma_percentile={config['drs_gamma_percentile']:g}",
    }[config["rule"]]
    check_accepted(accepted, p, description)

    with np.load(paths.FAKES, allow_pickle=False) as fakes:
        images, latents = fakes["images"], fakes["latents"]
    sample_id = scores["sample_id"].to_numpy()

    with atomic_path(paths.REJECT_DIR) as directory:
        directory.mkdir()
        with open(directory / paths.KEPT.name, "wb") as stream:
            np.savez(stream, images=images[accepted], latents=latents[accepted], sample_id=sample_id[accepted])
        scores.assign(accepted=accepted, acceptance_probability=decisions.acceptance_probability).to_parquet(
            directory / paths.DECISIONS.name, index=False
        )
        (directory / paths.RULE.name).write_text(json.dumps(decisions.rule.to_dict(), indent=2, sort_keys=True) + "\n")
    save_grid(_examples(images, logits, accepted), paths.PLOTS_DIR / "reject" / "examples.png")
    marked = threshold if config["rule"] == "threshold" else None
    held_p = held_out.loc[held_out["label"] == "real", "p_calibrated"].to_numpy()
    plots.save_figure(plots.p_histogram(p, held_p, marked, p_name), paths.PLOTS_DIR / "reject" / "p_histogram.png")

    num_accepted = int(accepted.sum())
    metrics = {
        "rule": config["rule"],
        "threshold": threshold,
        "num_scored": len(accepted),
        "num_accepted": num_accepted,
        "acceptance_rate": num_accepted / len(accepted),
        # What the same threshold keeps on raw p: shows what calibration changed.
        "acceptance_rate_raw": float(accept_threshold(scores["p_raw"].to_numpy(), threshold).mean()),
        "acceptance_rate_calibrated": float(accept_threshold(p, threshold).mean()),
        "mean_p_accepted": float(p[accepted].mean()),
        "mean_p_rejected": float(p[~accepted].mean()) if num_accepted < len(accepted) else None,
    }
    write_json(paths.METRICS_DIR / "reject.json", metrics)
    logger.info("kept %d of %d fakes (acceptance rate %.4f)", num_accepted, len(accepted), metrics["acceptance_rate"])


if __name__ == "__main__":
    run_stage("reject", main)
