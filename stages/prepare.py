"""Stage prepare: verify the Fashion-MNIST IDX files and write train/validation/test splits."""

import logging

from rsft import data, paths
from rsft.runtime import atomic_path, run_stage, write_json

logger = logging.getLogger("stages.prepare")


def main(params: dict) -> None:
    train, test = data.load_fashion_mnist(params["data"]["dir"], params["data"]["verify_checksum"])
    train, validation = data.split_train_validation(
        train, params["data"]["validation_size"], params["data"]["limit"], params["seed"]
    )

    with atomic_path(paths.PREPARED_DIR) as directory:
        directory.mkdir()
        for name, split in (("train", train), ("validation", validation), ("test", test)):
            data.save_split(split, directory / f"{name}.npz")

    sizes = {"train_size": len(train), "validation_size": len(validation), "test_size": len(test)}
    write_json(paths.METRICS_DIR / "prepare.json", sizes)
    logger.info("wrote splits %s", sizes)


if __name__ == "__main__":
    run_stage("prepare", main)
