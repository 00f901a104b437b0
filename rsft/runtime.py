"""What every stage shares: device choice, seeding, atomic outputs, error reporting."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from rsft.errors import RsftError
from rsft.params import load_params

logger = logging.getLogger(__name__)

# Stage costs (wall time, peak memory, device) go here, outside DVC's outputs,
# because timings differ between runs and would break reproducible hashes.
COSTS_DIR = Path("costs")

# Fault injection for tests: when this variable names a pause point, the
# process logs "paused at <point>" and sleeps there (RSFT_TEST_PAUSE_S seconds,
# default 120), so a test can kill or signal it at a known moment.
PAUSE_ENV = "RSFT_TEST_PAUSE_AT"
PAUSE_SECONDS_ENV = "RSFT_TEST_PAUSE_S"


def resolve_device(name: str) -> torch.device:
    """Turn the `device` param (auto, cpu, cuda) into a torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RsftError("device: cuda was requested but CUDA is not available; set device: auto or cpu")
    return torch.device(name)


def stream_seed(seed: int, purpose: str) -> int:
    """Derive an independent 63-bit seed for one use of the global seed.

    Distinct purposes ("generate", "calibration", ...) get unrelated random
    streams, so adding a new use never shifts the samples of an existing one.
    """
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global generator and return a CPU generator with the same seed."""
    torch.manual_seed(seed)
    # NOTE: on CUDA some kernels stay non-deterministic even with this flag
    # (warn_only keeps them usable), so GPU runs may differ in the last bits.
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def pause_point(name: str) -> None:
    """Sleep at the named point when RSFT_TEST_PAUSE_AT equals `name`; otherwise do nothing."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    logger.warning("paused at %s", name)
    time.sleep(float(os.environ.get(PAUSE_SECONDS_ENV, "120")))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` and move it into place on success.

    Works for files and directories. If the block raises or the process is
    killed, `path` keeps its old content (or stays absent) and the temporary
    path is removed or left with a `.tmp-` name that no stage reads. The
    pause point "rename <path>" lies between the finished temporary and the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(temporary)
    _remove_orphans(path)
    try:
        yield temporary
    except BaseException:
        _remove(temporary)
        raise
    pause_point(f"rename {path}")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(temporary, path)


def _remove_orphans(path: Path) -> None:
    """Remove temporaries of `path` left by killed processes (their pid no longer exists)."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove(leftover)
        except PermissionError:
            pass  # the process exists but belongs to another user


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically with sorted keys; NaN and infinity become null."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(_json_safe(data), indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON file written by an earlier stage."""
    path = Path(path)
    if not path.is_file():
        raise RsftError(f"{path} not found; run the stage that writes it first (`dvc repro`)")
    return json.loads(path.read_text())


def _peak_memory_mb() -> float:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# The stage run_stage is running: its name, start time (perf_counter) and device.
_running_stage: dict[str, Any] = {}


def current_stage_cost() -> dict[str, Any]:
    """Cost of the stage run_stage is running, so far: wall time, peak memory and device.

    Wall time counts from the start of the stage's work, after the
    interpreter started and imported torch (a few seconds per stage).
    Peak memory is the process's maximum resident set size.
    """
    if not _running_stage:
        raise RuntimeError("current_stage_cost() needs a stage started by run_stage")
    device = _running_stage["device"]
    cost = {
        "stage": _running_stage["name"],
        "wall_time_s": round(time.perf_counter() - _running_stage["started"], 3),
        "peak_memory_mb": round(_peak_memory_mb(), 1),
        "device": str(device),
    }
    if device.type == "cuda":
        cost["peak_cuda_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return cost


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"received signal {signal.Signals(signum).name}")


def run_stage(name: str, main: Callable[[dict[str, Any]], None], params_path: str = "params.yaml") -> None:
    """Validate params, run one stage and report user errors without a traceback.

    A stage's `main(params)` does the work. SIGTERM is turned into
    KeyboardInterrupt so that cleanup (temporary outputs, MLflow run status)
    runs as it does for Ctrl-C. Exits with status 1 on a user error and 130 on
    an interruption.
    """
    logging.basicConfig(
        level=os.environ.get("RSFT_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    from rsft.metrics import MetricInputError
    from rsft.rejection import NoFakesAcceptedError

    user_errors = (RsftError, NoFakesAcceptedError, MetricInputError)
    try:
        params = load_params(params_path)
        device = resolve_device(params["device"])
        _running_stage.update(name=name, started=time.perf_counter(), device=device)
        main(params)
    except user_errors as error:
        print(f"error in stage {name}: {error}", file=sys.stderr)
        sys.exit(1)
    except FileNotFoundError as error:
        # An input an earlier stage writes is missing, e.g. a stage run by hand out of order.
        # pandas' parquet reader leaves `filename` unset and names the file in the message.
        missing = error.filename or str(error)
        print(f"error in stage {name}: {missing} not found; run the stages before it "
              f"(`dvc repro {name}`)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"stage {name} interrupted; outputs it had not finished were discarded and DVC recorded "
              f"nothing for this run. Rerun `dvc repro` to complete it.", file=sys.stderr)
        sys.exit(130)

    cost = current_stage_cost()
    write_json(COSTS_DIR / f"{name}.json", cost)
    logger.info("stage %s finished in %.1f s", name, cost["wall_time_s"])
