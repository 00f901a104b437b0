"""Optional standard Inception FID from a local weights file (off by default).

The evaluator-feature FID (`fid_*`) is this project's own scale; papers report
FID in the features of the TensorFlow Inception v3 port used by torch-fidelity.
When `evaluate.inception_weights` names a local file of those weights (for
example weights-inception-2015-12-05-6726825d.pth from the torch-fidelity
releases), `evaluate` also reports `fid_inception_<set>`. Nothing is downloaded:
a missing file or package raises an error that names what to install.

Needs the optional packages torch-fidelity and a torchvision build that
matches the installed torch; neither is in requirements.txt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rsft.errors import RsftError

INCEPTION_FEATURES = "2048"


def load_inception(weights_path: str | Path, device: torch.device) -> torch.nn.Module:
    """Build torch-fidelity's Inception v3 feature extractor from a local weights file.

    Raises:
        RsftError: The file does not exist or torch-fidelity is not installed.
    """
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise RsftError(
            f"evaluate.inception_weights={str(weights_path)!r} is not a file; download the Inception v3 "
            f"weights of torch-fidelity (weights-inception-2015-12-05-6726825d.pth) or set it to \"\" to skip"
        )
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as error:
        raise RsftError(
            f"Inception FID needs the optional package torch-fidelity ({error}); install it with "
            f"`pip install torch-fidelity==0.3.0` and a torchvision matching torch, or set "
            f"evaluate.inception_weights to \"\""
        ) from None

    extractor = FeatureExtractorInceptionV3(
        "inception-v3-compat", [INCEPTION_FEATURES], feature_extractor_weights_path=str(path)
    )
    return extractor.to(device).eval()


@torch.no_grad()
def images_to_inception_features(
    extractor: torch.nn.Module, images: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    """Return 2048-d pool features (float64 [n, 2048]) of uint8 grayscale images [n, 28, 28].

    Images are repeated to three channels; the extractor resizes to 299x299.
    """
    features = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size]).to(device)
        rgb = batch[:, None].expand(-1, 3, -1, -1).contiguous()
        (pool,) = extractor(rgb)
        features.append(pool.double().cpu().numpy())
    return np.concatenate(features)
