"""Dataset loading: missing, truncated, corrupt and foreign IDX files, and custom data without the official checksum."""

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from rsft import data
from rsft.errors import DataError
from tests.conftest import REPO_ROOT, make_tiny_repo, tool_env

OFFICIAL_DIR = Path("/usr/share/datasets/fashion-mnist")
LABELS = "t10k-labels-idx1-ubyte"

needs_official = pytest.mark.skipif(not OFFICIAL_DIR.is_dir(), reason="Fashion-MNIST not installed")


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_dataset(directory: Path, train_labels: np.ndarray, test_labels: np.ndarray, seed: int = 0) -> Path:
    """Write four gzip-compressed IDX files of random 28x28 images with the given labels."""
    random = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, labels in (("train", train_labels), ("t10k", test_labels)):
        images = random.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return directory


@pytest.fixture
def official_copy(tmp_path) -> Path:
    """A copy of the official data directory, so a test can damage one of its files."""
    directory = tmp_path / "fashion-mnist"
    shutil.copytree(OFFICIAL_DIR, directory)
    return directory


def run_prepare(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=root, env=tool_env(root),
                          capture_output=True, text=True, timeout=300)


def test_missing_directory(tmp_path):
    with pytest.raises(DataError) as raised:
        data.load_fashion_mnist(tmp_path / "absent")
    assert f"data directory {tmp_path / 'absent'} does not exist" in str(raised.value)
    assert "apt-get install dataset-fashion-mnist" in str(raised.value)


@needs_official
def test_missing_file(official_copy):
    (official_copy / f"{LABELS}.gz").unlink()
    with pytest.raises(DataError) as raised:
        data.read_idx_bytes(official_copy, LABELS)
    assert f"Fashion-MNIST file {LABELS}(.gz) not found in {official_copy}" in str(raised.value)


@needs_official
def test_truncated_gzip(official_copy):
    path = official_copy / f"{LABELS}.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError) as raised:
        data.read_idx_bytes(official_copy, LABELS)
    assert f"{path} is truncated or corrupt" in str(raised.value)


@needs_official
def test_corrupt_deflate_stream(official_copy):
    # Flipped bytes inside the compressed stream make zlib itself fail.
    path = official_copy / f"{LABELS}.gz"
    content = bytearray(path.read_bytes())
    content[100:200] = bytes(byte ^ 0xFF for byte in content[100:200])
    path.write_bytes(bytes(content))
    with pytest.raises(DataError) as raised:
        data.read_idx_bytes(official_copy, LABELS)
    assert f"{path} is truncated or corrupt" in str(raised.value)


@needs_official
def test_wrong_checksum(official_copy):
    path = official_copy / f"{LABELS}.gz"
    content = bytearray(gzip.decompress(path.read_bytes()))
    content[-1] ^= 0x01
    path.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(DataError) as raised:
        data.read_idx_bytes(official_copy, LABELS)
    assert f"{path} failed its checksum" in str(raised.value)
    assert "data.verify_checksum: false" in str(raised.value)


@needs_official
def test_uncompressed_file_accepted(official_copy):
    gz = official_copy / f"{LABELS}.gz"
    (official_copy / LABELS).write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    assert len(data.read_idx_bytes(official_copy, LABELS)) == 10008


@pytest.mark.parametrize("content, fragment", [
    (b"", "is not an unsigned-byte IDX file"),
    (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00", "is not an unsigned-byte IDX file"),
    (b"\x00\x00\x08\x03\x00\x00", "IDX header announces 3 dimensions"),
    (idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-5], "header announces shape (4, 28, 28)"),
])
def test_malformed_idx(content, fragment):
    with pytest.raises(DataError) as raised:
        data.parse_idx(content, "custom")
    assert fragment in str(raised.value)


def test_custom_data_needs_checksum_off(tmp_path):
    directory = write_dataset(tmp_path / "custom", np.zeros(20, np.uint8), np.zeros(5, np.uint8))
    with pytest.raises(DataError) as raised:
        data.load_fashion_mnist(directory)
    assert "failed its checksum" in str(raised.value)


def test_custom_data_loads_unverified(tmp_path):
    directory = write_dataset(tmp_path / "custom", np.full(20, 3, np.uint8), np.full(5, 3, np.uint8))
    train, test = data.load_fashion_mnist(directory, verify_checksum=False)
    assert train.images.shape == (20, 28, 28)
    assert set(test.labels.tolist()) == {3}


def test_custom_label_out_of_range(tmp_path):
    directory = write_dataset(tmp_path / "custom", np.full(20, 10, np.uint8), np.zeros(5, np.uint8))
    with pytest.raises(DataError) as raised:
        data.load_fashion_mnist(directory, verify_checksum=False)
    assert "label 10 found, expected labels 0 to 9" in str(raised.value)


def test_custom_wrong_image_size(tmp_path):
    directory = write_dataset(tmp_path / "custom", np.zeros(20, np.uint8), np.zeros(5, np.uint8))
    images = np.zeros((20, 32, 32), np.uint8)
    (directory / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    with pytest.raises(DataError) as raised:
        data.load_fashion_mnist(directory, verify_checksum=False)
    assert "images have shape (20, 32, 32), expected (n, 28, 28)" in str(raised.value)


def test_custom_label_count_mismatch(tmp_path):
    directory = write_dataset(tmp_path / "custom", np.zeros(20, np.uint8), np.zeros(5, np.uint8))
    (directory / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8))))
    with pytest.raises(DataError) as raised:
        data.load_fashion_mnist(directory, verify_checksum=False)
    assert "labels have shape (4,), expected (5,)" in str(raised.value)


def test_validation_leaves_two_images():
    train = data.Split(np.zeros((10, 28, 28), np.uint8), np.zeros(10, np.uint8))
    with pytest.raises(DataError) as raised:
        data.split_train_validation(train, validation_size=9, limit=0, seed=0)
    assert "data.validation_size=9 leaves fewer than 2 training images" in str(raised.value)


def test_prepare_writes_nothing_on_bad_data(tmp_path):
    root = make_tiny_repo(tmp_path / "repo")
    corrupt = tmp_path / "corrupt"
    write_dataset(corrupt, np.zeros(20, np.uint8), np.zeros(5, np.uint8))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["dir"] = str(corrupt)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    result = run_prepare(root)

    assert result.returncode == 1
    assert "error in stage prepare:" in result.stderr
    assert "failed its checksum" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "data" / "prepared").exists()
    assert not (root / "metrics" / "prepare.json").exists()
    assert list((root / "data").glob(".*.tmp-*")) == []


def test_checksum_verified_by_default():
    text = (REPO_ROOT / "params.yaml").read_text()
    assert "verify_checksum: true" in text
