"""Optional Inception FID: each failure names the fix, and nothing is downloaded."""

import importlib.util

import pytest
import torch

from rsft.errors import RsftError
from rsft.inception import load_inception


def test_missing_weights_file_names_param(tmp_path):
    missing = tmp_path / "weights.pth"
    with pytest.raises(RsftError, match="evaluate.inception_weights") as error:
        load_inception(missing, torch.device("cpu"))
    assert str(missing) in str(error.value)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_missing_package_says_how_to_install(tmp_path):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not used")
    with pytest.raises(RsftError, match="pip install torch-fidelity"):
        load_inception(weights, torch.device("cpu"))
