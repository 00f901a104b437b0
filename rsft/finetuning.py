"""Fine-tuning the generator on kept fakes, the equal-compute control, and rounds.

Every method continues adversarial training from the trained GAN, optimizer
state included, for `finetune.steps` generator and discriminator updates per
round, each on one batch of `finetune.batch_size` real-side images and as many
fresh fakes. One step therefore costs the same for every method and the
control: one generator forward pass of B latents, three discriminator passes
of B images (real side, fakes for D, fakes for G), and backward passes through
both networks. The methods differ only in the images on the discriminator's
"real" side and in which fakes carry the generator loss:

- adversarial: the real side is kept fakes only, so the discriminator learns
  to separate new fakes from kept ones and pulls the generator towards the
  kept set (distillation onto the kept fakes).
- mixed: the real side is a fraction `finetune.real_fraction` of real training
  images, the rest kept fakes.
- topk: normal GAN training on real images, but the generator loss is applied
  only to the fakes of each batch that pass the rule (top-k training, Sinha et
  al., NeurIPS 2020). The kept fakes themselves are not trained on; the rule
  only sets k.
- weighted: normal GAN training on real images, with each fake's generator
  loss weighted by its calibrated p = P(real | x): the score stage's
  calibrator (in later rounds, the round's own) applied to the current
  discriminator's logit.
- control (the finetune_control stage): real images only and the plain
  generator loss, i.e. training the GAN longer for the same number of updates.

Rounds (`finetune.rounds`): round 1 fine-tunes on the kept set of the reject
stage. Every later round first generates `generate.num_samples` fakes with
the generator of the previous round and scores them with its discriminator.
It then refits the calibration (`score.calibration`) on validation reals
against fresh fakes and applies `reject.rule`. With the threshold rule, the
threshold rises by `finetune.threshold_step` per round, capped at
MAX_ROUND_THRESHOLD. The round then fine-tunes from the previous round's
generator, discriminator and optimizer state.

All rounds run inside the finetune stage, and its output directory contains
every round (round_<k>/checkpoint.pt, and for k >= 2 the kept fakes, fitted
rule and calibrator of that round). One stage rather than a DVC `foreach`
over rounds, because round k needs round k - 1's checkpoint: a `foreach`
cannot chain its items, and a fixed chain of stages in dvc.yaml would not
follow `finetune.rounds`. The cost is that changing any round reruns all of
them.

The control runs `finetune.rounds` x `finetune.steps` updates in one stretch
and saves a checkpoint at each round boundary, so both have round-by-round
checkpoints after equal numbers of updates. The control does not pay for the
generation and scoring of later rounds (inference only).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

from rsft import data, paths
from rsft.acceptance import decide
from rsft.calibration import Calibrator, fit_calibrator
from rsft.checkpoint import gan_state, load_gan, save_checkpoint
from rsft.errors import RsftError
from rsft.models import Discriminator, Generator
from rsft.params import FINETUNE_METHODS
from rsft.rejection import NoFakesAcceptedError, check_accepted, p_quantiles, suggest_threshold
from rsft.runtime import atomic_path, stream_seed
from rsft.sampling import discriminator_logits, generate_images
from rsft.training import FakeWeights, LossRecord, make_adam, sample_latents, train_adversarial

logger = logging.getLogger(__name__)

CONTROL = "control"
# A rising round threshold stops here, so that some fakes still pass.
MAX_ROUND_THRESHOLD = 0.99
ROUND_DIRECTORY = "round_{}"
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class RoundInput:
    """Input of one fine-tuning round: the kept fakes and the rule that kept them."""

    kept_images: np.ndarray
    acceptance_rate: float
    calibrator: Calibrator
    threshold: float | None = None
    num_scored: int = 0


def real_fraction_for(method: str, real_fraction: float) -> float:
    """Fraction of real images on the discriminator's real side for a method or the control."""
    if method == "adversarial":
        return 0.0
    if method == "mixed":
        return real_fraction
    return 1.0


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
    """Yield `count` images at a time, reshuffled each pass, repeating images when there are fewer than `count`."""
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


def real_side_batches(
    method: str, real: torch.Tensor, kept: torch.Tensor | None, real_fraction: float, batch_size: int,
    generator: torch.Generator,
) -> Iterator[torch.Tensor]:
    """Batches of exactly `batch_size` images for the discriminator's real side.

    Batches never shrink at the end of an epoch, so every method and the
    control draw the same number of latents at every step.
    """
    fraction = real_fraction_for(method, real_fraction)
    if fraction < 1.0 and (kept is None or len(kept) == 0):
        raise RsftError(f"finetune.method={method} needs kept fakes, but none were given")
    return mixed_batches(real, kept if fraction < 1.0 else real[:0], fraction, batch_size, generator)


def select_top_fraction(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the max(1, round(fraction * n)) fakes with the highest logits.

    Ties at the cut are broken by position (torch.topk order), so exactly that
    many fakes are selected.
    """
    count = min(len(logits), max(1, round(fraction * len(logits))))
    mask = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    mask[torch.topk(logits, count).indices] = True
    return mask


def fake_weights_for(method: str, acceptance_rate: float, calibrator: Calibrator) -> FakeWeights | None:
    """Generator loss weights of a method: None (plain loss), top-k selection or calibrated p.

    topk keeps the fraction `acceptance_rate` of each batch, the share of
    fakes the rule kept, ranked by the current discriminator. The rule's own
    cutoff is not reused because it was fitted to the discriminator before
    fine-tuning, and the logit scale drifts as the discriminator trains.

    NOTE: k stays fixed, while Sinha et al. anneal k from the whole batch
    down to a minimum fraction over training. The weighted method applies the
    round's calibrator to a discriminator that keeps training, so its p drifts
    from calibrated over the round.
    """
    if method == "topk":
        return lambda logits: select_top_fraction(logits, acceptance_rate).float()
    if method == "weighted":
        def calibrated_p(logits: torch.Tensor) -> torch.Tensor:
            p = torch.from_numpy(calibrator.predict(logits.double().cpu().numpy()))
            # Isotonic calibration can map a whole batch to 0; fall back to equal weights.
            return p if float(p.sum()) > 0.0 else torch.ones_like(p)
        return calibrated_p
    return None


def continue_training(
    generator: Generator,
    discriminator: Discriminator,
    state: dict[str, Any],
    real_side: Iterator[torch.Tensor],
    steps: int,
    lr: float,
    latent_random: torch.Generator,
    device: torch.device,
    log_every: int,
    description: str,
    fake_weights: FakeWeights | None = None,
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
        generator, discriminator, optimizer_g, optimizer_d, real_side, steps, latent_random, device, log_every,
        first_step=first_step, description=description, fake_weights=fake_weights,
    )
    new_state = gan_state(generator, discriminator, optimizer_g, optimizer_d, state["config"], first_step + steps)
    return new_state, records


def update_count(state: dict[str, Any], optimizer: str = "optimizer_g") -> int:
    """Number of Adam updates recorded in a GAN checkpoint state (0 before the first)."""
    per_parameter = state[optimizer]["state"]
    if not per_parameter:
        return 0
    return int(next(iter(per_parameter.values()))["step"])


def round_threshold(threshold: float, round_index: int, threshold_step: float) -> float:
    """Threshold of round `round_index` (1-based): rises by threshold_step per round, capped."""
    raised = threshold + (round_index - 1) * threshold_step
    return min(raised, max(threshold, MAX_ROUND_THRESHOLD))


def select_round_input(
    generator: Generator,
    discriminator: Discriminator,
    validation_images: np.ndarray,
    params: dict[str, Any],
    method: str,
    round_index: int,
    device: torch.device,
) -> tuple[RoundInput, dict[str, Any]]:
    """Generate, score, calibrate and reject with the current GAN for round `round_index` >= 2.

    `method` is the fine-tuning method of the round, which may differ from
    params["finetune"]["method"] when a benchmark runs several methods.

    Returns:
        The round's input and the artifacts to store with it (kept images
        and logits, the fitted rule and the calibrator as dicts).

    Raises:
        RsftError: No fake passed the rule (unless `method` is weighted, which
            does not use the kept set), or calibration failed.
    """
    seed = params["finetune"]["seed"]
    batch_size = params["generate"]["batch_size"]
    latent_random = torch.Generator().manual_seed(stream_seed(seed, f"round {round_index} fakes"))
    fakes = generate_images(
        generator, sample_latents(params["generate"]["num_samples"], generator.latent_dim, latent_random),
        batch_size, device,
    )
    logits = discriminator_logits(discriminator, fakes, batch_size, device)

    # Calibration as in the score stage: validation reals against fresh fakes, the first half of each.
    count = min(params["score"]["num_calibration"], len(validation_images)) // 2
    calibration_random = torch.Generator().manual_seed(stream_seed(seed, f"round {round_index} calibration"))
    fresh = generate_images(
        generator, sample_latents(count, generator.latent_dim, calibration_random), batch_size, device
    )
    try:
        calibrator = fit_calibrator(
            params["score"]["calibration"],
            discriminator_logits(discriminator, validation_images[:count], batch_size, device),
            discriminator_logits(discriminator, fresh, batch_size, device),
        )
    except ValueError as error:
        raise RsftError(f"round {round_index}: calibration failed: {error}. Raise score.num_calibration") from None

    threshold = round_threshold(params["threshold"], round_index, params["finetune"]["threshold_step"])
    p = calibrator.predict(logits)
    rule = params["reject"]["rule"]
    decisions = decide(rule, logits, p, params["reject"], threshold, stream_seed(seed, f"round {round_index} drs"))
    description = f"reject.rule={rule}"
    if rule == "threshold":
        description = f"threshold={threshold:g} on p (score.calibration={params['score']['calibration']})"
    if method == "weighted" and not decisions.accepted.any():
        # weighted trains on real images with p-weighted fakes, so an empty kept set is only recorded.
        logger.warning("round %d: no fake passed %s; weighted does not use the kept set", round_index, description)
    elif rule == "threshold" and not decisions.accepted.any():
        raise RsftError(no_round_fakes_message(p, params, round_index, threshold))
    else:
        try:
            check_accepted(decisions.accepted, p, f"{description} in round {round_index}")
        except NoFakesAcceptedError as error:
            raise RsftError(f"round {round_index}: {error} Or lower finetune.rounds.") from None

    accepted = decisions.accepted
    round_input = RoundInput(
        kept_images=fakes[accepted],
        acceptance_rate=float(accepted.mean()),
        calibrator=calibrator,
        threshold=threshold if params["reject"]["rule"] == "threshold" else None,
        num_scored=len(fakes),
    )
    artifacts = {"images": fakes[accepted], "logits": logits[accepted], "rule": decisions.rule.to_dict(),
                 "calibrator": calibrator.to_dict()}
    return round_input, artifacts


def no_round_fakes_message(p: np.ndarray, params: dict[str, Any], round_index: int, threshold: float) -> str:
    """Explain an empty kept set of round `round_index` >= 2 under the threshold rule, with a step that keeps fakes."""
    base, step = params["threshold"], params["finetune"]["threshold_step"]
    quantiles = p_quantiles(p)
    message = (
        f"round {round_index}: no fake passed threshold={threshold:g} on p of this round's GAN "
        f"(threshold {base:g} + {round_index - 1} x finetune.threshold_step {step:g}, capped at "
        f"{MAX_ROUND_THRESHOLD:g}; observed p: median {quantiles['p50']:.3g}, max {quantiles['p100']:.3g})."
    )
    suggested = suggest_threshold(p)
    if suggested is not None and suggested > base:
        # The largest two-decimal step whose round threshold stays at or below the suggestion.
        fitting_step = math.floor((suggested - base) / (round_index - 1) * 100) / 100
        return (f"{message} Lower finetune.threshold_step, e.g. dvc exp run -S finetune.threshold_step={fitting_step:g}, "
                f"or lower finetune.rounds.")
    return (f"{message} Even threshold={base:g} keeps too few fakes of this round: lower threshold and "
            f"finetune.threshold_step (e.g. -S threshold={suggested if suggested is not None else 0:g} "
            f"-S finetune.threshold_step=0), or lower finetune.rounds.")


def _save_round_artifacts(directory: Path, artifacts: dict[str, Any]) -> None:
    with open(directory / "kept.npz", "wb") as stream:
        np.savez(stream, images=artifacts["images"], logits=artifacts["logits"])
    for name in ("rule", "calibrator"):
        (directory / f"{name}.json").write_text(json.dumps(artifacts[name], indent=2, sort_keys=True) + "\n")


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data.images_to_tensor_range(images))


def finetune_rounds(
    params: dict[str, Any],
    method: str,
    state: dict[str, Any],
    models: tuple[Generator, Discriminator],
    real_images: np.ndarray,
    validation_images: np.ndarray,
    first_round: RoundInput | None,
    output_dir: Path,
    device: torch.device,
) -> tuple[list[dict[str, Any]], list[LossRecord]]:
    """Run every round of a method (or the control) and save round_<k>/checkpoint.pt in `output_dir`.

    Args:
        params: Validated params.
        method: One of FINETUNE_METHODS, or CONTROL.
        state: GAN checkpoint state to continue from, matching `models`.
        models: The generator and discriminator loaded from `state`; trained in place.
        real_images: uint8 training images [n, 28, 28].
        validation_images: uint8 validation images, for recalibration in rounds >= 2.
        first_round: Kept fakes of the reject stage; None for the control.
        output_dir: Existing directory that receives the round directories and
            checkpoint.pt (the last round's state).
        device: Where to train.

    Returns:
        One row per round (round, threshold, num_scored, num_kept,
        acceptance_rate, generator_updates) and the loss records of all rounds.
    """
    if method != CONTROL and method not in FINETUNE_METHODS:
        raise RsftError(f"finetune.method: invalid value {method!r}; expected one of {', '.join(FINETUNE_METHODS)}")
    if method != CONTROL and first_round is None:
        raise RsftError(f"finetune.method={method} needs the kept fakes of the reject stage")
    config = params["finetune"]
    generator, discriminator = models
    real = _to_tensor(real_images)

    # Separate streams for latents and real-side batches, so that a method and the
    # control draw identical latents at every step although their batches differ.
    latent_random = torch.Generator().manual_seed(stream_seed(config["seed"], "finetune latents"))
    batch_random = torch.Generator().manual_seed(stream_seed(config["seed"], "finetune batches"))
    control_side = real_side_batches(CONTROL, real, None, 1.0, config["batch_size"], batch_random)

    rows: list[dict[str, Any]] = []
    records: list[LossRecord] = []
    round_input = first_round
    for round_index in range(1, config["rounds"] + 1):
        round_dir = output_dir / ROUND_DIRECTORY.format(round_index)
        round_dir.mkdir()
        if method == CONTROL:
            real_side, fake_weights = control_side, None
        else:
            if round_index > 1:
                round_input, artifacts = select_round_input(
                    generator, discriminator, validation_images, params, method, round_index, device
                )
                _save_round_artifacts(round_dir, artifacts)
            kept = _to_tensor(round_input.kept_images)
            real_side = real_side_batches(
                method, real, kept, config["real_fraction"], config["batch_size"], batch_random
            )
            fake_weights = fake_weights_for(method, round_input.acceptance_rate, round_input.calibrator)

        state, round_records = continue_training(
            generator, discriminator, state, real_side, config["steps"], config["lr"], latent_random, device,
            params["train_gan"]["log_every"], description=f"{method} round {round_index}", fake_weights=fake_weights,
        )
        save_checkpoint(state, round_dir / CHECKPOINT_NAME)
        records.extend(round_records)

        row: dict[str, Any] = {"round": round_index, "generator_updates": update_count(state)}
        if round_input is not None:
            row.update(
                threshold=round_input.threshold, num_scored=round_input.num_scored,
                num_kept=len(round_input.kept_images), acceptance_rate=round_input.acceptance_rate,
            )
        rows.append(row)
        logger.info("%s round %d done: %s", method, round_index, row)

    save_checkpoint(state, output_dir / CHECKPOINT_NAME)
    return rows, records


def round_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(round, checkpoint path) of every round a finetune or control stage wrote, in order."""
    found = []
    for path in directory.glob("round_*/" + CHECKPOINT_NAME):
        suffix = path.parent.name.removeprefix("round_")
        if suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def diversity_drops(results: dict[str, float], max_drop: float, compared: str = "finetuned") -> list[str]:
    """Messages for each of recall and coverage of `compared` that fell more than max_drop below the baseline."""
    messages = []
    for metric in ("recall", "coverage"):
        baseline = results[f"{metric}_baseline"]
        value = results[f"{metric}_{compared}"]
        if baseline - value > max_drop:
            messages.append(
                f"{metric} of the {compared} generator is {value:.3f}, {baseline - value:.3f} below the "
                f"baseline's {baseline:.3f} (evaluate.max_recall_drop={max_drop:g})"
            )
    return messages


def finetune_stage(
    params: dict[str, Any], method: str, first_round: RoundInput | None, device: torch.device, name: str
) -> dict[str, Any]:
    """Run a stage's rounds from the trained GAN; write data/<name>/, its loss and round tables.

    Args:
        params: Validated params.
        method: One of FINETUNE_METHODS, or CONTROL.
        first_round: Kept fakes of the reject stage; None for the control.
        device: Where to train.
        name: Stage name; selects the output paths.

    Returns:
        Metrics of the stage: method, rounds, steps per round, updates done,
        kept fakes and acceptance rate of the first and last round, final losses.
    """
    generator, discriminator, state = load_gan(paths.GAN_CHECKPOINT, device)
    start_updates = update_count(state)
    train = data.load_split(paths.TRAIN_SPLIT)
    validation = data.load_split(paths.VALIDATION_SPLIT)

    with atomic_path(paths.GAN_DIR.parent / name) as directory:
        directory.mkdir()
        rows, records = finetune_rounds(
            params, method, state, (generator, discriminator), train.images, validation.images, first_round,
            directory, device,
        )

    for table, file_name in ((pd.DataFrame([record.__dict__ for record in records]), "losses.csv"),
                             (pd.DataFrame(rows), "rounds.csv")):
        with atomic_path(paths.PLOTS_DIR / name / file_name) as temporary:
            table.to_csv(temporary, index=False)

    config = params["finetune"]
    result = {
        "method": method,
        "rounds": config["rounds"],
        "steps": config["steps"],
        "generator_updates": rows[-1]["generator_updates"] - start_updates,
        "final_loss_d": records[-1].loss_d,
        "final_loss_g": records[-1].loss_g,
    }
    if first_round is not None:
        result.update(
            num_kept=rows[0]["num_kept"], acceptance_rate=rows[0]["acceptance_rate"],
            num_kept_last_round=rows[-1]["num_kept"], acceptance_rate_last_round=rows[-1]["acceptance_rate"],
        )
    return result
