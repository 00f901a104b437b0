"""MLflow tracking: one run per evaluate execution, with what is needed to reproduce it.

The default store is a SQLite file at the DVC repository root, found through
DVC_ROOT: `dvc exp run --queue` and `--temp` run stages in a copy under
.dvc/tmp/exps/ but set DVC_ROOT to the original repository, so every
experiment lands in the same store. MLFLOW_TRACKING_URI overrides the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from rsft.errors import TrackingError
from rsft.params import flatten

logger = logging.getLogger(__name__)

DATABASE_NAME = "mlflow.db"
ARTIFACTS_DIRECTORY = "mlartifacts"
# SQLite allows one writer at a time; runs from parallel queue workers wait
# for the lock file instead of failing with "database is locked".
LOCK_TIMEOUT_S = 600.0
WRITE_ATTEMPTS = 5
VERSIONED_PACKAGES = ("torch", "dvc", "mlflow", "numpy", "pandas", "scikit-learn")


def repository_root() -> Path:
    """The DVC repository whose store receives runs: DVC_ROOT, else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else the SQLite store at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / DATABASE_NAME}"


def _sqlite_path(uri: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on a SQLite store for the duration of the block.

    Other stores (an MLflow server) handle concurrency themselves, so no lock
    is taken for them.
    """
    database = _sqlite_path(uri)
    if database is None:
        yield
        return

    lock_path = database.with_name(database.name + ".lock")
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+")
    except OSError as error:
        raise TrackingError(f"cannot open the MLflow store lock {lock_path}: {error}") from None

    with handle:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrackingError(
                        f"timed out after {LOCK_TIMEOUT_S:.0f} s waiting for {lock_path}; another "
                        f"process holds the MLflow store. Rerun `dvc repro evaluate` when it is done."
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def git_commit(root: Path) -> tuple[str | None, bool | None]:
    """Return (HEAD commit, whether tracked files differ from it) or (None, None) outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(status.strip())


def lock_hashes(lock_file: Path) -> dict[str, str]:
    """Map every output path in dvc.lock to its md5, as `dvc.md5.<path>` tags."""
    if not lock_file.is_file():
        return {}
    lock = yaml.safe_load(lock_file.read_text()) or {}
    hashes = {}
    for stage in (lock.get("stages") or {}).values():
        for entry in (stage.get("outs") or []) + (stage.get("deps") or []):
            if "md5" in entry:
                hashes[f"dvc.md5.{entry['path']}"] = entry["md5"]
    return hashes


def lineage_tags(device: str) -> dict[str, str]:
    """Tags that trace a run to its code, DVC experiment, artifacts and environment."""
    cwd = Path.cwd()
    commit, dirty = git_commit(cwd)
    tags = {
        "git_commit": commit or "unknown",
        "git_dirty": str(dirty).lower() if dirty is not None else "unknown",
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "dvc_root": str(repository_root()),
        "device": device,
        "python_version": platform.python_version(),
    }
    for package in VERSIONED_PACKAGES:
        try:
            tags[f"version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    tags.update(lock_hashes(cwd / "dvc.lock"))
    return {key: value for key, value in tags.items() if value != ""}


def run_name(params: dict[str, Any]) -> str:
    """The DVC experiment name when DVC sets one, else a name built from the rule."""
    name = os.environ.get("DVC_EXP_NAME")
    if name:
        return name
    rule = params["reject"]["rule"]
    setting = f"threshold={params['threshold']:g}" if rule == "threshold" else f"rule={rule}"
    return f"{setting} {params['finetune']['method']}"


def format_param(value: Any) -> str:
    """Render a param value the same way every time (1.0 stays '1.0', True becomes 'true')."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def log_run(
    experiment: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    tags: dict[str, str],
    artifacts: list[Path],
    step_metrics: dict[str, list[tuple[int, float]]] | None = None,
    run_name: str | None = None,
) -> str:
    """Create one finished MLflow run; return its id.

    The run is written in one short block under the store lock. An exception
    or interruption (Ctrl-C, SIGTERM) inside it ends the run as FAILED or
    KILLED instead of leaving it RUNNING.

    Raises:
        TrackingError: The store cannot be reached or written.
    """
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    root = repository_root()
    uri = tracking_uri(root)
    client = mlflow.MlflowClient(tracking_uri=uri)

    with store_lock(uri):
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                experiment_id = _experiment_id(client, experiment, root, uri)
                run = client.create_run(experiment_id, run_name=run_name, tags=tags)
                break
            except (MlflowException, OperationalError) as error:
                if attempt == WRITE_ATTEMPTS:
                    raise TrackingError(
                        f"cannot write to the MLflow store {uri}: {error}. The DVC outputs of this stage "
                        f"are complete; fix the store (or set MLFLOW_TRACKING_URI) and rerun "
                        f"`dvc repro evaluate`."
                    ) from None
                logger.warning("MLflow store %s not writable (attempt %d): %s; retrying", uri, attempt, error)
                time.sleep(attempt)

        run_id = run.info.run_id
        status = "FAILED"
        try:
            timestamp = int(time.time() * 1000)
            flat_params = [Param(key, format_param(value)) for key, value in sorted(flatten(params).items())]
            metric_entities = [Metric(key, float(value), timestamp, 0) for key, value in sorted(metrics.items())]
            for key, series in (step_metrics or {}).items():
                metric_entities.extend(Metric(key, float(value), timestamp, step) for step, value in series)
            # log_batch accepts at most 100 params and 1000 metrics per call.
            for start in range(0, len(flat_params), 100):
                client.log_batch(run_id, params=flat_params[start:start + 100])
            for start in range(0, len(metric_entities), 1000):
                client.log_batch(run_id, metrics=metric_entities[start:start + 1000])
            for path in artifacts:
                if path.is_file():
                    folder = None if str(path.parent) == "." else str(path.parent)
                    client.log_artifact(run_id, str(path), artifact_path=folder)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except (MlflowException, OperationalError, OSError) as error:
            raise TrackingError(f"writing MLflow run {run_id} to {uri} failed: {error}") from None
        finally:
            client.set_terminated(run_id, status=status)
    logger.info("logged MLflow run %s (%s) in experiment %r at %s", run_id, status, experiment, uri)
    return run_id


def _experiment_id(client: Any, name: str, root: Path, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # An explicit artifact location keeps artifacts beside the store, not
    # under the working directory (a temporary copy for queued experiments).
    location = (root / ARTIFACTS_DIRECTORY).as_uri() if _sqlite_path(uri) else None
    return client.create_experiment(name, artifact_location=location)
