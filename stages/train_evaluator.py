"""Stage train_evaluator: train the classifier whose features define FID and the other metrics."""

import logging

import torch

from rsft import data, paths
from rsft.checkpoint import save_evaluator
from rsft.models import Evaluator
from rsft.runtime import resolve_device, run_stage, seed_everything, write_json
from rsft.training import predict_in_batches, train_evaluator

logger = logging.getLogger("stages.train_evaluator")


def main(params: dict) -> None:
    config = params["train_evaluator"]
    device = resolve_device(params["device"])
    generator = seed_everything(params["seed"])

    train = data.load_split(paths.TRAIN_SPLIT)
    test = data.load_split(paths.TEST_SPLIT)
    train_images = torch.from_numpy(data.images_to_tensor_range(train.images))
    train_labels = torch.from_numpy(train.labels.astype("int64"))

    evaluator = Evaluator().to(device)
    losses = train_evaluator(
        evaluator, train_images, train_labels, config["epochs"], config["batch_size"], config["lr"], generator, device
    )

    test_images = torch.from_numpy(data.images_to_tensor_range(test.images))
    predictions = predict_in_batches(evaluator, test_images, 1000, device).argmax(dim=1).numpy()
    test_accuracy = float((predictions == test.labels).mean())
    logger.info("evaluator test accuracy %.4f", test_accuracy)
    if test_accuracy < 0.9:
        logger.warning(
            "evaluator test accuracy %.3f is below 0.90: its features make FID less meaningful; "
            "raise train_evaluator.epochs or data.limit", test_accuracy,
        )

    save_evaluator(evaluator, paths.EVALUATOR_CHECKPOINT, test_accuracy)
    write_json(paths.METRICS_DIR / "train_evaluator.json", {"test_accuracy": test_accuracy, "final_loss": losses[-1]})


if __name__ == "__main__":
    run_stage("train_evaluator", main)
