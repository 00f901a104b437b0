"""Fashion-MNIST: read the official IDX files, verify them, split and store them."""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsft.errors import DataError

logger = logging.getLogger(__name__)

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28

# MD5 of the decompressed IDX files as published with the official release.
# Checking the decompressed bytes accepts the official .gz files as well as
# repackaged ones: Debian's dataset-fashion-mnist recompresses them, so the
# .gz digests differ while the IDX content is identical.
IDX_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}

HOW_TO_GET_DATA = (
    "Install the data with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, "
    "files under /usr/share/datasets/fashion-mnist), or download the four official "
    "*-ubyte.gz files from the Fashion-MNIST release (github.com/zalandoresearch/fashion-mnist) "
    "and set data.dir in params.yaml to their directory."
)

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Split:
    """Images as uint8 [n, 28, 28] and labels as uint8 [n]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def read_idx_bytes(directory: Path, name: str, verify_checksum: bool = True) -> bytes:
    """Read one IDX file, plain or gzip-compressed, and verify its MD5 when verify_checksum is true.

    Raises:
        DataError: The file is missing, unreadable, truncated, corrupt or fails its checksum.
    """
    candidates = [directory / f"{name}.gz", directory / name]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise DataError(f"Fashion-MNIST file {name}(.gz) not found in {directory}. {HOW_TO_GET_DATA}")

    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                content = stream.read()
        else:
            content = path.read_bytes()
    except PermissionError as error:
        raise DataError(f"{path} cannot be read ({error}); fix its permissions") from None
    except (OSError, EOFError, zlib.error) as error:
        # gzip raises EOFError when truncated, BadGzipFile (an OSError) for a
        # wrong header or CRC, and zlib.error for a damaged deflate stream.
        raise DataError(f"{path} is truncated or corrupt ({error}). {HOW_TO_GET_DATA}") from None

    if not verify_checksum:
        return content
    digest = hashlib.md5(content).hexdigest()
    if digest != IDX_MD5[name]:
        raise DataError(
            f"{path} failed its checksum: MD5 of the IDX content is {digest}, "
            f"expected {IDX_MD5[name]}. {HOW_TO_GET_DATA} For your own data in the "
            f"Fashion-MNIST format, set data.verify_checksum: false."
        )
    return content


def parse_idx(content: bytes, source: str) -> np.ndarray:
    """Decode IDX bytes (magic, dims, uint8 payload) into an array.

    Raises:
        DataError: The bytes are not a complete unsigned-byte IDX file.
    """
    if len(content) < 4 or content[0:2] != b"\x00\x00" or content[2] != 0x08:
        raise DataError(f"{source} is not an unsigned-byte IDX file (it must start with bytes 00 00 08)")
    ndim = content[3]
    header = 4 + 4 * ndim
    if len(content) < header:
        raise DataError(f"{source}: IDX header announces {ndim} dimensions but the file ends after {len(content)} bytes")
    shape = tuple(int.from_bytes(content[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    payload = np.frombuffer(content, dtype=np.uint8, offset=header)
    if payload.size != int(np.prod(shape)):
        raise DataError(f"{source}: header announces shape {shape} but holds {payload.size} values")
    return payload.reshape(shape)


def _check_split(images: np.ndarray, labels: np.ndarray, source: str) -> Split:
    """Check that decoded IDX arrays form a split of 28x28 images with labels 0-9."""
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{source}: images have shape {images.shape}, expected (n, {IMAGE_SIZE}, {IMAGE_SIZE})")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{source}: labels have shape {labels.shape}, expected ({len(images)},) to match the images")
    if len(labels) == 0:
        raise DataError(f"{source}: contains no images")
    if labels.max() >= NUM_CLASSES:
        raise DataError(f"{source}: label {int(labels.max())} found, expected labels 0 to {NUM_CLASSES - 1}")
    return Split(images, labels)


def load_fashion_mnist(directory: str | Path, verify_checksum: bool = True) -> tuple[Split, Split]:
    """Load the training and test sets from the four IDX files of `directory`.

    Args:
        directory: Directory with the files, each plain or gzip-compressed.
        verify_checksum: Compare the decompressed files with the official
            Fashion-MNIST MD5s. Without it any IDX files in the same format
            load (data.verify_checksum: false, for your own data).

    Raises:
        DataError: A file is missing, unreadable, corrupt, fails its checksum
            or does not hold 28x28 images with labels 0-9.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"data directory {directory} does not exist. {HOW_TO_GET_DATA}")

    arrays = {
        name: parse_idx(read_idx_bytes(directory, name, verify_checksum), str(directory / name))
        for name in IDX_MD5
    }
    train = _check_split(arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"], f"{directory}/train-*")
    test = _check_split(arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"], f"{directory}/t10k-*")
    if not verify_checksum:
        logger.warning("data.verify_checksum is false: loaded %d training and %d test images from %s "
                       "without comparing them to the official Fashion-MNIST files", len(train), len(test), directory)
    return train, test


def split_train_validation(train: Split, validation_size: int, limit: int, seed: int) -> tuple[Split, Split]:
    """Move a seeded random validation split out of the training set.

    Args:
        train: The official training set.
        validation_size: Images moved into the validation split.
        limit: Cap on the remaining training images; 0 keeps all.
        seed: Seed of the permutation.

    Returns:
        (train, validation) splits.
    """
    # GAN and evaluator batches need two images (batch normalization).
    if validation_size > len(train) - 2:
        raise DataError(
            f"data.validation_size={validation_size} leaves fewer than 2 training images "
            f"(the training set has {len(train)}); use at most {len(train) - 2}"
        )

    order = np.random.default_rng(seed).permutation(len(train))
    validation_index = np.sort(order[:validation_size])
    train_index = np.sort(order[validation_size:])
    if limit:
        train_index = np.sort(order[validation_size:validation_size + limit])

    validation = Split(train.images[validation_index], train.labels[validation_index])
    train = Split(train.images[train_index], train.labels[train_index])
    return train, validation


def save_split(split: Split, path: Path) -> None:
    """Write a split as an uncompressed .npz (byte-identical for equal content)."""
    with open(path, "wb") as stream:
        np.savez(stream, images=split.images, labels=split.labels)


def load_split(path: str | Path) -> Split:
    """Read a split written by save_split."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found; run `dvc repro prepare` first")
    with np.load(path, allow_pickle=False) as archive:
        return Split(archive["images"], archive["labels"])


def images_to_tensor_range(images: np.ndarray) -> np.ndarray:
    """Map uint8 images [n, 28, 28] to float32 [n, 1, 28, 28] in [-1, 1]."""
    return (images.astype(np.float32)[:, None] / 127.5) - 1.0


def tensor_range_to_images(values: np.ndarray) -> np.ndarray:
    """Map float images [n, 1, 28, 28] in [-1, 1] to uint8 [n, 28, 28]."""
    scaled = np.rint((np.clip(values[:, 0], -1.0, 1.0) + 1.0) * 127.5)
    return scaled.astype(np.uint8)
