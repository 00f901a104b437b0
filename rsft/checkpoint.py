"""Checkpoints: byte-reproducible saving and validated, pickle-free loading."""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsft.errors import CheckpointError
from rsft.models import Discriminator, Evaluator, Generator
from rsft.runtime import atomic_path

GAN_FORMAT = "rsft-gan/1"
EVALUATOR_FORMAT = "rsft-evaluator/1"

_SERIALIZATION_ID = ".data/serialization_id"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Save with torch.save so that equal states give byte-identical files.

    torch.save stores a random serialization id and the current time in its
    zip archive. Both are replaced here: the id by a digest of the other
    records, the timestamps by 1980-01-01, so DVC sees equal hashes for equal
    weights. The file still loads with torch.load.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)

    with zipfile.ZipFile(buffer) as source:
        records = [(info.filename, source.read(info.filename)) for info in source.infolist()]
    digest = hashlib.sha256()
    for name, content in records:
        if not name.endswith(_SERIALIZATION_ID):
            digest.update(name.encode())
            digest.update(content)

    with atomic_path(path) as temporary:
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as target:
            for name, content in records:
                if name.endswith(_SERIALIZATION_ID):
                    content = digest.hexdigest()[: len(content)].encode()
                target.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), content)


def _load_state(path: str | Path, expected_format: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; run the stage that writes it (`dvc repro`)")
    try:
        # weights_only=True: no arbitrary code runs while unpickling a shared file.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path} is not a loadable rsft checkpoint: {error}") from None
    if not isinstance(state, dict) or state.get("format") != expected_format:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} has format {found!r}, expected {expected_format!r}")
    return state


def _load_weights(module: nn.Module, weights: Any, path: Path, part: str) -> None:
    try:
        module.load_state_dict(weights, strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: {part} weights do not match the model ({first_line})") from None


def gan_state(
    generator: Generator,
    discriminator: Discriminator,
    optimizer_g: torch.optim.Optimizer,
    optimizer_d: torch.optim.Optimizer,
    config: dict[str, Any],
    step: int,
) -> dict[str, Any]:
    """Bundle a GAN and its optimizers, on the CPU, for save_checkpoint."""
    return {
        "format": GAN_FORMAT,
        "config": dict(config),
        "step": int(step),
        "generator": {k: v.cpu() for k, v in generator.state_dict().items()},
        "discriminator": {k: v.cpu() for k, v in discriminator.state_dict().items()},
        "optimizer_g": optimizer_g.state_dict(),
        "optimizer_d": optimizer_d.state_dict(),
    }


def load_gan(path: str | Path, device: torch.device) -> tuple[Generator, Discriminator, dict[str, Any]]:
    """Load a GAN checkpoint; return the models on `device` and the raw state.

    Raises:
        CheckpointError: The file is missing, foreign, or its shapes do not
            match the architecture its config describes.
    """
    path = Path(path)
    state = _load_state(path, GAN_FORMAT)
    config = state.get("config")
    required = {"latent_dim", "base_channels", "spectral_norm"}
    if not isinstance(config, dict) or not required <= set(config):
        raise CheckpointError(f"{path}: config must contain {sorted(required)}")

    generator = Generator(int(config["latent_dim"]), int(config["base_channels"]))
    discriminator = Discriminator(int(config["base_channels"]), bool(config["spectral_norm"]))
    _load_weights(generator, state.get("generator"), path, "generator")
    _load_weights(discriminator, state.get("discriminator"), path, "discriminator")
    return generator.to(device), discriminator.to(device), state


def save_evaluator(evaluator: Evaluator, path: str | Path, test_accuracy: float) -> None:
    """Save the evaluator classifier."""
    state = {
        "format": EVALUATOR_FORMAT,
        "weights": {k: v.cpu() for k, v in evaluator.state_dict().items()},
        "test_accuracy": float(test_accuracy),
    }
    save_checkpoint(state, path)


def load_evaluator(path: str | Path, device: torch.device) -> Evaluator:
    """Load the evaluator classifier in eval mode."""
    path = Path(path)
    state = _load_state(path, EVALUATOR_FORMAT)
    evaluator = Evaluator()
    _load_weights(evaluator, state.get("weights"), path, "evaluator")
    return evaluator.to(device).eval()
