"""Checkpoints: byte-reproducible saving, and loading restricted to tensors (weights_only) with validation."""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsft.errors import CheckpointError, TrainingDivergedError
from rsft.models import Discriminator, Evaluator, Generator
from rsft.runtime import atomic_path

GAN_FORMAT = "rsft-gan/1"
EVALUATOR_FORMAT = "rsft-evaluator/1"

_SERIALIZATION_ID = ".data/serialization_id"

# Keys every GAN checkpoint must contain; fine-tuning resumes from all of them.
GAN_KEYS = ("format", "config", "step", "generator", "discriminator", "optimizer_g", "optimizer_d")
# Errors torch.load raises on files that are not torch checkpoints or that
# weights_only=True rejects (a text file, for one, ends in a KeyError).
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, ValueError,
                TypeError, AttributeError, UnicodeDecodeError)


def _first_line(error: BaseException, limit: int = 160) -> str:
    """Return "<type>: <first line of the message>", cut to `limit` characters."""
    text = str(error).strip()
    line = f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _non_finite_tensor(tree: Any, prefix: str = "") -> str | None:
    """Return the dotted name of the first floating tensor with NaN or infinity in `tree`, else None."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            return prefix or "<tensor>"
        return None
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        found = _non_finite_tensor(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return None


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Save with torch.save so that equal states give byte-identical files.

    torch.save stores a random serialization id and the current time in its
    zip archive. Both are replaced here: the id by a digest of the other
    records, the timestamps by 1980-01-01, so DVC sees equal hashes for equal
    weights. The file still loads with torch.load.

    Raises:
        TrainingDivergedError: A tensor of `state` contains NaN or infinity;
            nothing is written.
    """
    broken = _non_finite_tensor(state)
    if broken:
        raise TrainingDivergedError(
            f"training diverged: {broken} contains NaN or infinity, so no checkpoint was written. "
            f"Lower the learning rate (e.g. halve train_gan.lr, finetune.lr or train_evaluator.lr)."
        )

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
    except _LOAD_ERRORS as error:
        raise CheckpointError(
            f"{path} is not a loadable rsft checkpoint ({_first_line(error)}); "
            f"regenerate it with `dvc repro` or use a checkpoint written by this pipeline"
        ) from None
    if not isinstance(state, dict) or state.get("format") != expected_format:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} has format {found!r}, expected {expected_format!r}")
    return state


def _check_shapes(expected: nn.Module, weights: Any, path: Path, part: str) -> None:
    """Compare a state dict's keys and tensor shapes with those of `expected` (which may live on the meta device)."""
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: {part} weights are a {type(weights).__name__}, expected a state dict")
    reference = expected.state_dict()
    missing = sorted(set(reference) - set(weights))
    unexpected = sorted(set(weights) - set(reference))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: {part} weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, tensor in reference.items():
        value = weights[key]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(
                f"{path}: {part} weight {key} has shape {found}, expected {tuple(tensor.shape)}"
            )


def _load_weights(module: nn.Module, weights: Any, path: Path, part: str) -> None:
    _check_shapes(module, weights, path, part)
    try:
        module.load_state_dict(weights, strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path}: {part} weights do not match the model ({_first_line(error)})") from None


def _check_config(config: Any, path: Path) -> dict[str, Any]:
    """Validate the architecture config of a GAN checkpoint before any model is built."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config is a {type(config).__name__}, expected a mapping")
    for key in ("latent_dim", "base_channels"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{path}: config {key} is {value!r}, expected an integer >= 1")
    if not isinstance(config.get("spectral_norm"), bool):
        raise CheckpointError(f"{path}: config spectral_norm is {config.get('spectral_norm')!r}, expected true or false")
    return config


def _check_optimizer(module: nn.Module, optimizer_state: Any, path: Path, part: str) -> None:
    """Check that an Adam state dict fits `module`, as fine-tuning resumes from it."""
    try:
        optimizer = torch.optim.Adam(module.parameters())
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
        raise CheckpointError(f"{path}: {part} does not match the model ({_first_line(error)})") from None
    for parameter in module.parameters():
        moments = optimizer.state.get(parameter, {})
        for name in ("exp_avg", "exp_avg_sq"):
            value = moments.get(name)
            if value is not None and (not isinstance(value, torch.Tensor) or value.shape != parameter.shape):
                raise CheckpointError(f"{path}: {part} {name} does not match the shape of its parameter")


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
    missing = [key for key in GAN_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: missing {missing}; a GAN checkpoint contains {list(GAN_KEYS)}")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: step is {step!r}, expected an integer >= 0")
    config = _check_config(state["config"], path)

    def build_generator() -> Generator:
        return Generator(config["latent_dim"], config["base_channels"])

    def build_discriminator() -> Discriminator:
        return Discriminator(config["base_channels"], config["spectral_norm"])

    # Shapes are compared on the meta device first, so a foreign config (say
    # base_channels: 100000) fails here instead of allocating gigabytes.
    for build, part in ((build_generator, "generator"), (build_discriminator, "discriminator")):
        with torch.device("meta"):
            skeleton = build()
        _check_shapes(skeleton, state[part], path, part)

    generator = build_generator()
    discriminator = build_discriminator()
    _load_weights(generator, state["generator"], path, "generator")
    _load_weights(discriminator, state["discriminator"], path, "discriminator")
    _check_optimizer(generator, state["optimizer_g"], path, "optimizer_g")
    _check_optimizer(discriminator, state["optimizer_d"], path, "optimizer_d")
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
