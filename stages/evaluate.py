"""Stage evaluate: FID and diversity metrics for every sample set; one MLflow run.

Sets, each of evaluate.num_samples images (clipped to the test split's size),
against the real test split: real (training images: the floor), baseline
(trained generator), rejection (trained generator with the reject rule applied
at inference), finetuned and control. All generators share the evaluation
latents drawn from evaluate.seed.
"""

import json
import logging

import numpy as np
import pandas as pd
import torch

from rsft import data, evaluation, metrics, paths, tracking
from rsft.acceptance import FittedRule
from rsft.calibration import Calibrator
from rsft.checkpoint import load_evaluator, load_gan
from rsft.errors import RsftError
from rsft.finetuning import diversity_drops, round_checkpoints
from rsft.images import save_grid
from rsft.inception import images_to_inception_features, load_inception
from rsft.runtime import (
    atomic_path, current_stage_cost, read_json, resolve_device, run_stage, seed_everything, stream_seed, write_json,
)
from rsft.sampling import generate_images
from rsft.training import sample_latents

logger = logging.getLogger("stages.evaluate")

# Metrics of these stages are logged to MLflow under their own names; the
# others get a "<stage>." prefix to keep names unique.
UNPREFIXED_STAGES = ("evaluate", "reject")
LOGGED_STAGES = ("prepare", "train_evaluator", "train_gan", "score", "reject", "finetune", "finetune_control")
ARTIFACTS = (
    paths.GAN_SAMPLES, paths.PLOTS_DIR / "reject" / "examples.png", paths.PLOTS_DIR / "reject" / "p_histogram.png",
    paths.PLOTS_DIR / "score" / "acceptance_curve.csv", paths.CALIBRATOR, paths.RULE,
)


def _sample_sets(params: dict, device: torch.device, count: int) -> dict[str, np.ndarray]:
    config = params["evaluate"]
    train = data.load_split(paths.TRAIN_SPLIT)
    real_order = np.random.default_rng(stream_seed(config["seed"], "real")).permutation(len(train))[:count]
    sets = {"real": train.images[np.sort(real_order)]}

    generator, discriminator, _ = load_gan(paths.GAN_CHECKPOINT, device)
    latent_random = torch.Generator().manual_seed(stream_seed(config["seed"], "latents"))
    latents = sample_latents(count, generator.latent_dim, latent_random)
    sets["baseline"] = generate_images(generator, latents, config["batch_size"], device)

    rule = FittedRule.from_dict(read_json(paths.RULE))
    calibrator = Calibrator.from_dict(read_json(paths.CALIBRATOR))
    sets["rejection"], num_drawn = evaluation.sample_with_rejection(
        generator, discriminator, rule, calibrator, count, count * config["max_draws_per_sample"],
        config["batch_size"], stream_seed(config["seed"], "rejection"), device,
    )
    sets["rejection_num_drawn"] = num_drawn
    if len(sets["rejection"]) < count:
        logger.warning(
            "rejection at inference kept %d of %d requested fakes after %d draws "
            "(evaluate.max_draws_per_sample=%d); its metrics use fewer samples and are biased",
            len(sets["rejection"]), count, num_drawn, config["max_draws_per_sample"],
        )
    # Precision, recall, density and coverage use PRDC_K nearest neighbours, so they need one more sample.
    if len(sets["rejection"]) <= evaluation.PRDC_K:
        raise RsftError(
            f"rejection at inference kept {len(sets['rejection'])} fakes in {num_drawn} draws, fewer than the "
            f"{evaluation.PRDC_K + 1} the metrics need. Raise evaluate.max_draws_per_sample (now "
            f"{config['max_draws_per_sample']}) or keep more fakes (lower threshold, raise reject.keep_fraction)."
        )

    for name, checkpoint in (("finetuned", paths.FINETUNE_CHECKPOINT), ("control", paths.CONTROL_CHECKPOINT)):
        tuned, _, _ = load_gan(checkpoint, device)
        sets[name] = generate_images(tuned, latents, config["batch_size"], device)
    return sets


def _pipeline_metrics() -> dict[str, float]:
    """Numeric metrics of every stage, as logged to MLflow."""
    logged = {}
    for stage in LOGGED_STAGES:
        path = paths.METRICS_DIR / f"{stage}.json"
        if not path.is_file():
            continue
        for key, value in json.loads(path.read_text()).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                logged[key if stage in UNPREFIXED_STAGES else f"{stage}.{key}"] = value
    return logged


# Metrics plotted over fine-tuning rounds in MLflow (step = round; step 0 is the trained GAN).
ROUND_METRICS = ("fid", "precision", "recall", "coverage")
DIVERSITY_TAG = "diversity_warning"


def _round_metrics(
    params: dict, evaluator, reference: np.ndarray, results: dict[str, float], device: torch.device, count: int
) -> dict[str, list[tuple[int, float]]]:
    """Series "rounds.<metric>_<set>" for the fine-tuned and control generators, one point per round.

    The last round is the finetuned (control) set evaluated above; earlier
    rounds are evaluated here on the same evaluation latents.
    """
    config = params["evaluate"]
    series: dict[str, list[tuple[int, float]]] = {}
    for set_name, directory in (("finetuned", paths.FINETUNE_CHECKPOINT.parent),
                                ("control", paths.CONTROL_CHECKPOINT.parent)):
        checkpoints = round_checkpoints(directory)
        for key in ROUND_METRICS:
            series[f"rounds.{key}_{set_name}"] = [(0, results[f"{key}_baseline"])]
        for position, (round_index, checkpoint) in enumerate(checkpoints):
            if position == len(checkpoints) - 1:
                values = {key: results[f"{key}_{set_name}"] for key in ROUND_METRICS}
            else:
                generator, _, _ = load_gan(checkpoint, device)
                latent_random = torch.Generator().manual_seed(stream_seed(config["seed"], "latents"))
                latents = sample_latents(count, generator.latent_dim, latent_random)
                images = generate_images(generator, latents, config["batch_size"], device)
                features, labels = evaluation.images_to_features(evaluator, images, config["batch_size"], device)
                values = evaluation.features_to_set_metrics(
                    reference, features, labels, stream_seed(config["seed"], "kid")
                )
            for key in ROUND_METRICS:
                series[f"rounds.{key}_{set_name}"].append((round_index, values[key]))

    table = pd.read_csv(paths.PLOTS_DIR / "finetune" / "rounds.csv")
    for column in ("acceptance_rate", "num_kept", "threshold"):
        if column in table:
            points = zip(table["round"], table[column])
            series[f"rounds.{column}"] = [(int(step), float(value)) for step, value in points if pd.notna(value)]
    return series


def main(params: dict) -> None:
    config = params["evaluate"]
    device = resolve_device(params["device"])
    seed_everything(config["seed"])
    evaluator = load_evaluator(paths.EVALUATOR_CHECKPOINT, device)
    # Loaded first so that a missing weights file fails before any sampling.
    extractor = load_inception(config["inception_weights"], device) if config["inception_weights"] else None
    test = data.load_split(paths.TEST_SPLIT)
    count = min(config["num_samples"], len(test))
    if count < config["num_samples"]:
        logger.warning("evaluate.num_samples=%d exceeds the test split; using %d", config["num_samples"], count)

    sets = _sample_sets(params, device, count)
    num_drawn = sets.pop("rejection_num_drawn")
    reference, _ = evaluation.images_to_features(evaluator, test.images[:count], config["batch_size"], device)

    results: dict[str, float] = {"num_samples": count, "num_samples_rejection": len(sets["rejection"]),
                                 "rejection_inference_acceptance_rate": len(sets["rejection"]) / max(num_drawn, 1)}
    class_fractions = {}
    grids = {}
    for name in evaluation.SET_NAMES:
        features, labels = evaluation.images_to_features(evaluator, sets[name], config["batch_size"], device)
        set_metrics = evaluation.features_to_set_metrics(reference, features, labels, stream_seed(config["seed"], "kid"))
        for key, value in set_metrics.items():
            if key.startswith(metrics.KEY_CLASS_FRACTION_PREFIX):
                class_fractions[f"{key}_{name}"] = value
            else:
                results[f"{key}_{name}"] = value
        grids[name] = evaluation.per_class_examples(sets[name], labels)
        logger.info("%s: FID %.2f, precision %.3f, recall %.3f", name, set_metrics["fid"],
                    set_metrics["precision"], set_metrics["recall"])

    if extractor is not None:
        inception_reference = images_to_inception_features(extractor, test.images[:count], config["batch_size"], device)
        for name in evaluation.SET_NAMES:
            features = images_to_inception_features(extractor, sets[name], config["batch_size"], device)
            results[f"fid_inception_{name}"] = metrics.features_to_fid(inception_reference, features)

    # All grids appear at once, so an interrupted run leaves no partial data/evaluate.
    with atomic_path(paths.EVALUATE_DIR) as directory:
        directory.mkdir()
        for name, grid in grids.items():
            save_grid(grid, directory / f"classes_{name}.png")

    results["fid_gain_vs_control"] = (results["fid_control"] - results["fid_finetuned"]) / results["fid_control"]
    diversity_messages = diversity_drops(results, config["max_recall_drop"])
    for message in diversity_messages:
        logger.warning("diversity warning: %s", message)
    write_json(paths.METRICS_DIR / "evaluate.json", results)
    write_json(paths.METRICS_DIR / "evaluate_classes.json", class_fractions)

    logged = metrics.finite_metrics({**_pipeline_metrics(), **results, **class_fractions})
    step_metrics = {}
    for stage in ("train_gan", "finetune", "finetune_control"):
        losses = pd.read_csv(paths.PLOTS_DIR / stage / "losses.csv")
        for column in ("loss_d", "loss_g"):
            step_metrics[f"{stage}.{column}"] = list(zip(losses["step"], losses[column]))
    step_metrics.update(_round_metrics(params, evaluator, reference, results, device, count))
    artifacts = [*ARTIFACTS, *sorted(paths.EVALUATE_DIR.glob("*.png")), paths.PARAMS, paths.LOCK]

    # Timings differ on every run, so costs stay out of DVC's outputs. metrics/costs.json is a
    # top-level metrics file that `dvc exp show` lists. Evaluate's own cost ends here, before logging.
    costs = {**tracking.read_stage_costs(), "evaluate": {**current_stage_cost(), "source": "workspace"}}
    cost_logged, cost_tags = tracking.cost_metrics(costs)
    write_json(tracking.COSTS_METRICS, {
        tracking.KEY_RSFT_OVERHEAD: cost_logged.get(tracking.KEY_RSFT_OVERHEAD),
        **{stage: {key: cost[key] for key in tracking.COST_FIELDS if key in cost} for stage, cost in costs.items()},
    })

    tracking.log_run(
        params["tracking"]["experiment"], params, {**logged, **cost_logged},
        {**tracking.lineage_tags(str(device)), **cost_tags, DIVERSITY_TAG: str(bool(diversity_messages)).lower()},
        artifacts,
        step_metrics=step_metrics, run_name=tracking.run_name(params),
        datasets=[tracking.prepared_dataset(paths.PREPARED_DIR, paths.LOCK)],
    )


if __name__ == "__main__":
    run_stage("evaluate", main)
