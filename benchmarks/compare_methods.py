"""Compare the fine-tuning methods with the equal-compute control, over several seeds.

Trains one evaluator and one GAN (cached in --work-dir), scores fakes, applies
each rejection rule, then fine-tunes with every method and runs the control for
each fine-tuning seed. Every generator is evaluated on the same evaluation
latents against the test split in the evaluator's features (paired comparison).
Prints mean +- sd over seeds of FID, precision, recall and coverage per set,
and each method's relative FID gain over the control of the same seed.

The default scale is reduced to fit a shared 2-core CPU machine: a GAN of
--gan-steps updates (default 1200 at batch 64, about 1.4 epochs of the 55k
training split) and --steps fine-tuning updates (default 150, one eighth of
the GAN's training). Results are appended to <work-dir>/results.jsonl as they
arrive, so an interrupted run can be resumed or reported with --report-only.

    python -m benchmarks.compare_methods --work-dir /tmp/compare
    python -m benchmarks.compare_methods --work-dir /tmp/compare --plan top50:weighted "p>0.5:topk"
    python -m benchmarks.compare_methods --work-dir /tmp/compare --rounds 2 --plan top50:topk

The second and third commands reuse the cached models and add rows to the
same table. With --rounds k, the control runs k * --steps updates and the
rows are named "<set> (k rounds)".
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rsft import data, evaluation, metrics
from rsft.acceptance import decide
from rsft.calibration import fit_calibrator
from rsft.checkpoint import gan_state, load_evaluator, load_gan, save_checkpoint, save_evaluator
from rsft.finetuning import CONTROL, RoundInput, finetune_rounds
from rsft.models import Discriminator, Evaluator, Generator
from rsft.runtime import stream_seed
from rsft.sampling import discriminator_logits, generate_images
from rsft.training import make_adam, sample_latents, shuffled_batches, train_adversarial, train_evaluator

logger = logging.getLogger("benchmarks.compare_methods")

# (name, reject.rule, threshold, keep_fraction); thresholds apply to Platt-calibrated p.
RULES = {
    "top50": ("quantile", 0.5, 0.5),
    "p>0.5": ("threshold", 0.5, 0.5),
    "p>0.8": ("threshold", 0.8, 0.5),
}
SHOWN_METRICS = ("fid", "precision", "recall", "coverage")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="cache of models and results.jsonl")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST IDX files")
    parser.add_argument("--gan-steps", type=int, default=1200, help="GAN training updates")
    parser.add_argument("--batch-size", type=int, default=64, help="batch of GAN training and fine-tuning")
    parser.add_argument("--base-channels", type=int, default=16, help="DCGAN width")
    parser.add_argument("--evaluator-epochs", type=int, default=1, help="evaluator training epochs")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning updates per method, control included")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="finetune.seed values")
    parser.add_argument("--num-fakes", type=int, default=10000, help="scored fakes per rule")
    parser.add_argument("--eval-samples", type=int, default=3000, help="images per evaluated set")
    parser.add_argument("--plan", nargs="+", default=["top50:mixed", "top50:topk", "top50:adversarial"],
                        help="rule:method pairs to fine-tune; rules: " + ", ".join(RULES))
    parser.add_argument("--rounds", type=int, default=1,
                        help="finetune.rounds; the control then runs rounds * steps updates")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--report-only", action="store_true", help="print the table of results.jsonl and exit")
    return parser.parse_args()


def prepare_data(args: argparse.Namespace) -> tuple[data.Split, data.Split, data.Split]:
    train, test = data.load_fashion_mnist(args.data_dir)
    train, validation = data.split_train_validation(train, 5000, 0, seed=0)
    return train, validation, test


def cached_evaluator(args: argparse.Namespace, train: data.Split, test: data.Split) -> Evaluator:
    path = args.work_dir / "evaluator.pt"
    if not path.is_file():
        torch.manual_seed(0)
        evaluator = Evaluator()
        images = torch.from_numpy(data.images_to_tensor_range(train.images))
        labels = torch.from_numpy(train.labels.astype(np.int64))
        train_evaluator(evaluator, images, labels, args.evaluator_epochs, 128, 1e-3, torch.Generator().manual_seed(0),
                        torch.device("cpu"))
        predictions = evaluator(torch.from_numpy(data.images_to_tensor_range(test.images))).argmax(1).numpy()
        save_evaluator(evaluator, path, float((predictions == test.labels).mean()))
    return load_evaluator(path, torch.device("cpu"))


def cached_gan(args: argparse.Namespace, train: data.Split) -> Path:
    path = args.work_dir / "gan.pt"
    if not path.is_file():
        torch.manual_seed(0)
        random = torch.Generator().manual_seed(0)
        generator, discriminator = Generator(64, args.base_channels), Discriminator(args.base_channels)
        optimizer_g, optimizer_d = make_adam(generator, 2e-4), make_adam(discriminator, 2e-4)
        images = torch.from_numpy(data.images_to_tensor_range(train.images))
        batches = shuffled_batches(images, args.batch_size, random)
        for first_step in range(0, args.gan_steps, 200):
            train_adversarial(generator, discriminator, optimizer_g, optimizer_d, batches,
                              min(200, args.gan_steps - first_step), random, torch.device("cpu"), 50,
                              first_step=first_step, description="benchmark GAN")
            logger.info("GAN: %d of %d updates", min(first_step + 200, args.gan_steps), args.gan_steps)
        config = {"latent_dim": 64, "base_channels": args.base_channels, "spectral_norm": False}
        save_checkpoint(gan_state(generator, discriminator, optimizer_g, optimizer_d, config, args.gan_steps), path)
    return path


def set_metrics(evaluator: Evaluator, reference: np.ndarray, images: np.ndarray) -> dict[str, float]:
    features, labels = evaluation.images_to_features(evaluator, images, 500, torch.device("cpu"))
    result = {"fid": metrics.features_to_fid(reference, features)}
    result.update(metrics.features_to_prdc(reference, features, k=evaluation.PRDC_K))
    result.update(metrics.labels_to_mode_coverage(labels, data.NUM_CLASSES))
    return result


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path, row: dict) -> None:
    with open(path, "a") as stream:
        stream.write(json.dumps(row) + "\n")


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def print_table(rows: list[dict]) -> None:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["set"], []).append(row)
    control_fid = {(row["seed"], row.get("rounds", 1)): row["fid"]
                   for name, members in groups.items() if name.startswith(CONTROL) for row in members}

    header = f"{'set':<22} {'n':>2} " + " ".join(f"{name:>16}" for name in SHOWN_METRICS)
    print(header + f" {'acc. rate':>9} {'FID gain vs control':>20}")
    for name, members in groups.items():
        cells = " ".join(f"{mean_sd([m[key] for m in members]):>16}" for key in SHOWN_METRICS)
        acceptance = members[0].get("acceptance_rate")
        keys = [(m.get("seed"), m.get("rounds", 1)) for m in members]
        gains = [(control_fid[key] - member["fid"]) / control_fid[key]
                 for key, member in zip(keys, members) if key in control_fid]
        gain = mean_sd(gains) if gains and not name.startswith(CONTROL) else ""
        rate = f"{acceptance:.3f}" if acceptance is not None else ""
        print(f"{name:<22} {len(members):>2} {cells} {rate:>9} {gain:>20}")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("rsft.calibration").setLevel(logging.WARNING)
    results_path = args.work_dir / "results.jsonl"
    if args.report_only:
        print_table(load_results(results_path))
        return

    args.work_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    done = {(row["set"], row.get("seed")) for row in load_results(results_path)}
    started = time.perf_counter()

    train, validation, test = prepare_data(args)
    evaluator = cached_evaluator(args, train, test)
    gan_path = cached_gan(args, train)
    logger.info("models ready after %.0f s", time.perf_counter() - started)

    count = min(args.eval_samples, len(test))
    reference, _ = evaluation.images_to_features(evaluator, test.images[:count], 500, device)
    generator, discriminator, _ = load_gan(gan_path, device)
    latents = sample_latents(count, 64, torch.Generator().manual_seed(stream_seed(1234, "latents")))

    def record(name: str, images: np.ndarray, seed: int | None = None, **extra: float) -> None:
        row = {"set": name, "seed": seed, **set_metrics(evaluator, reference, images), **extra}
        append_result(results_path, row)
        logger.info("%s seed %s: FID %.2f recall %.3f (%.0f s)", name, seed, row["fid"], row["recall"],
                    time.perf_counter() - started)

    if ("real", None) not in done:
        order = np.random.default_rng(0).permutation(len(train))[:count]
        record("real", train.images[np.sort(order)])
    if ("baseline", None) not in done:
        record("baseline", generate_images(generator, latents, 500, device))

    # Score fakes and fit the calibration once, as the score stage does.
    scored_latents = sample_latents(args.num_fakes, 64, torch.Generator().manual_seed(1))
    fakes = generate_images(generator, scored_latents, 500, device)
    logits = discriminator_logits(discriminator, fakes, 500, device)
    fresh = generate_images(generator, sample_latents(2500, 64, torch.Generator().manual_seed(2)), 500, device)
    calibrator = fit_calibrator("platt", discriminator_logits(discriminator, validation.images[:2500], 500, device),
                                discriminator_logits(discriminator, fresh, 500, device))
    p = calibrator.predict(logits)

    base_params = {
        "threshold": 0.5, "train_gan": {"log_every": 50},
        "generate": {"num_samples": args.num_fakes, "batch_size": 500},
        "score": {"calibration": "platt", "num_calibration": 5000},
        "reject": {"rule": "quantile", "keep_fraction": 0.5, "drs_gamma_percentile": 80.0, "drs_epsilon": 1e-6},
        "finetune": {"method": "mixed", "real_fraction": 0.5, "steps": args.steps, "batch_size": args.batch_size,
                     "lr": 2e-4, "seed": 0, "rounds": args.rounds, "threshold_step": 0.0},
    }
    rules = {}
    for rule_name in {entry.split(":")[0] for entry in args.plan}:
        rule, threshold, keep_fraction = RULES[rule_name]
        decisions = decide(rule, logits, p, {**base_params["reject"], "keep_fraction": keep_fraction}, threshold, 0)
        if decisions.accepted.sum() < 2:
            logger.warning("rule %s keeps %d fakes; skipping it", rule_name, decisions.accepted.sum())
            continue
        rules[rule_name] = RoundInput(fakes[decisions.accepted], float(decisions.accepted.mean()), calibrator,
                                      num_scored=len(fakes))
        if (f"rejection {rule_name}", None) not in done:
            images, _ = evaluation.sample_with_rejection(
                generator, discriminator, decisions.rule, calibrator, count, count * 100, 500, 3, device
            )
            # The rate on the scored fakes: images / drawn would count the unused rest of the last batch.
            record(f"rejection {rule_name}", images, acceptance_rate=float(decisions.accepted.mean()))

    for seed in args.seeds:
        params = {**base_params, "finetune": {**base_params["finetune"], "seed": seed}}
        suffix = f" ({args.rounds} rounds)" if args.rounds > 1 else ""
        for entry in [CONTROL, *args.plan]:
            rule_name, _, method = entry.rpartition(":")
            if (entry + suffix, seed) in done or (rule_name and rule_name not in rules):
                continue
            state_generator, state_discriminator, state = load_gan(gan_path, device)
            torch.manual_seed(seed)
            with tempfile.TemporaryDirectory() as output:
                finetune_rounds(params, method, state, (state_generator, state_discriminator), train.images,
                                validation.images, rules.get(rule_name), Path(output), device)
            extra = {"acceptance_rate": rules[rule_name].acceptance_rate} if rule_name else {}
            record(entry + suffix, generate_images(state_generator, latents, 500, device), seed,
                   rounds=args.rounds, **extra)

    print(f"scale: GAN {args.gan_steps} updates at batch {args.batch_size} (base_channels {args.base_channels}); "
          f"fine-tuning {args.steps} updates at batch {args.batch_size}; {count} evaluation samples; "
          f"{args.rounds} round(s); seeds {args.seeds}; {time.perf_counter() - started:.0f} s")
    print_table(load_results(results_path))


if __name__ == "__main__":
    main()
