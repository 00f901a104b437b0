"""Checkpoint security and validation: weights_only loading, foreign files, NaN weights; no shell, loopback-only UI."""

import os
import re
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from rsft.checkpoint import gan_state, load_evaluator, load_gan, save_checkpoint
from rsft.errors import CheckpointError, TrainingDivergedError
from rsft.models import Discriminator, Generator
from tests.conftest import REPO_ROOT

CONFIG = {"latent_dim": 8, "base_channels": 4, "spectral_norm": False}
CPU = torch.device("cpu")


def small_gan_state(config: dict = CONFIG) -> dict:
    torch.manual_seed(0)
    generator = Generator(config["latent_dim"], config["base_channels"])
    discriminator = Discriminator(config["base_channels"], config["spectral_norm"])
    optimizer_g = torch.optim.Adam(generator.parameters())
    optimizer_d = torch.optim.Adam(discriminator.parameters())
    return gan_state(generator, discriminator, optimizer_g, optimizer_d, config, step=3)


class RunsShellCommand:
    """A pickle payload that would create `marker` if unpickling ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_gan_round_trip(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(small_gan_state(), path)
    generator, discriminator, state = load_gan(path, CPU)
    assert generator.latent_dim == CONFIG["latent_dim"]
    assert state["step"] == 3


def test_save_is_byte_reproducible(tmp_path):
    save_checkpoint(small_gan_state(), tmp_path / "a.pt")
    save_checkpoint(small_gan_state(), tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_pickled_code_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "rsft-gan/1", "payload": RunsShellCommand(marker)}, path)
    with pytest.raises(CheckpointError) as raised:
        load_gan(path, CPU)
    assert "is not a loadable rsft checkpoint (UnpicklingError" in str(raised.value)
    assert not marker.exists()


def foreign_files() -> list:
    good = small_gan_state()
    other_config = {**CONFIG, "latent_dim": 16}
    return [
        pytest.param(lambda p: p.write_text("not a checkpoint"), "is not a loadable rsft checkpoint", id="text"),
        pytest.param(lambda p: p.write_bytes(b""), "is not a loadable rsft checkpoint (EOFError)", id="empty"),
        pytest.param(lambda p: zipfile.ZipFile(p, "w").writestr("a.txt", "x"), "is not a loadable", id="zip"),
        pytest.param(lambda p: torch.save(torch.zeros(3), p), "has format 'Tensor', expected 'rsft-gan/1'",
                     id="tensor"),
        pytest.param(lambda p: torch.save({**good, "format": "rsft-evaluator/1"}, p),
                     "has format 'rsft-evaluator/1'", id="evaluator"),
        pytest.param(lambda p: torch.save({k: v for k, v in good.items() if k != "optimizer_g"}, p),
                     "missing ['optimizer_g']", id="no-optimizer"),
        pytest.param(lambda p: torch.save({**good, "step": "3"}, p), "step is '3', expected an integer", id="step"),
        pytest.param(lambda p: torch.save({**good, "config": {**CONFIG, "latent_dim": "8"}}, p),
                     "config latent_dim is '8', expected an integer >= 1", id="config-type"),
        pytest.param(lambda p: torch.save({**good, "config": {**CONFIG, "base_channels": -4}}, p),
                     "config base_channels is -4", id="config-negative"),
        # 10**5 channels would allocate about 5 TB if the model were built before the shape check.
        pytest.param(lambda p: torch.save({**good, "config": {**CONFIG, "base_channels": 10**5}}, p),
                     "generator weight net.1.weight has shape (8, 16, 7, 7), expected (8, 400000, 7, 7)",
                     id="config-huge"),
        pytest.param(lambda p: torch.save({**good, "config": other_config}, p),
                     "generator weight net.1.weight has shape (8, 16, 7, 7), expected (16, 16, 7, 7)",
                     id="config-mismatch"),
        pytest.param(lambda p: torch.save({**good, "generator": [1, 2]}, p),
                     "generator weights are a list, expected a state dict", id="weights-list"),
        pytest.param(lambda p: torch.save({**good, "optimizer_g": good["optimizer_d"]}, p),
                     "optimizer_g does not match the model", id="optimizer-swapped"),
    ]


@pytest.mark.parametrize("make, fragment", foreign_files())
def test_foreign_gan_checkpoint(tmp_path, make, fragment):
    path = tmp_path / "checkpoint.pt"
    make(path)
    with pytest.raises(CheckpointError) as raised:
        load_gan(path, CPU)
    assert str(path) in str(raised.value)
    assert fragment in str(raised.value)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(small_gan_state(), path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError) as raised:
        load_gan(path, CPU)
    assert "is not a loadable rsft checkpoint" in str(raised.value)


def test_missing_checkpoint_names_fix(tmp_path):
    with pytest.raises(CheckpointError) as raised:
        load_evaluator(tmp_path / "evaluator.pt", CPU)
    assert "not found; run the stage that writes it (`dvc repro`)" in str(raised.value)


def test_gan_file_as_evaluator(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(small_gan_state(), path)
    with pytest.raises(CheckpointError) as raised:
        load_evaluator(path, CPU)
    assert "has format 'rsft-gan/1', expected 'rsft-evaluator/1'" in str(raised.value)


def test_nan_weights_not_saved(tmp_path):
    state = small_gan_state()
    state["generator"]["net.1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(TrainingDivergedError) as raised:
        save_checkpoint(state, path)
    assert "training diverged: generator.net.1.weight contains NaN or infinity" in str(raised.value)
    assert "Lower the learning rate" in str(raised.value)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def python_sources() -> list[Path]:
    return sorted((REPO_ROOT / "rsft").glob("*.py")) + sorted((REPO_ROOT / "stages").glob("*.py"))


def test_every_torch_load_is_weights_only():
    calls = []
    for source in python_sources():
        for match in re.finditer(r"torch\.load\(([^)]*)\)", source.read_text()):
            calls.append((source.name, match.group(1)))
    assert calls, "no torch.load call found"
    for name, arguments in calls:
        assert "weights_only=True" in arguments, f"{name}: torch.load({arguments})"


def test_no_shell_in_sources():
    for source in python_sources():
        text = source.read_text()
        for pattern in ("shell=True", "os.system(", "os.popen(", "subprocess.getoutput("):
            assert pattern not in text, f"{source.name} uses {pattern}"


def test_stage_commands_take_no_params():
    # DVC runs `cmd` through a shell, so an interpolated param could inject commands.
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert "${" not in stage["cmd"], f"stage {name} interpolates params into its command"
        assert re.fullmatch(r"python -m stages\.\w+", stage["cmd"]), f"stage {name}: {stage['cmd']}"


def test_mlflow_ui_binds_loopback():
    documents = [REPO_ROOT / "Makefile"] + [path for path in [REPO_ROOT / "README.md"] if path.is_file()]
    commands = [
        line for document in documents for line in document.read_text().splitlines()
        if re.search(r"mlflow (ui|server)\b", line)
    ]
    assert commands, "no MLflow UI command found"
    for line in commands:
        assert "--host 127.0.0.1" in line, line
