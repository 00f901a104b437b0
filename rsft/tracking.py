"""MLflow tracking: one run per evaluate execution, with what is needed to reproduce it.

The default store is a SQLite file at the DVC repository root, found through
DVC_ROOT: `dvc exp run --queue` and `--temp` run stages in a copy under
.dvc/tmp/exps/ but set DVC_ROOT to the original repository, so every
experiment lands in the same store. MLFLOW_TRACKING_URI overrides the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from rsft.errors import TrackingError
from rsft.params import flatten
from rsft.runtime import pause_point

logger = logging.getLogger(__name__)

DATABASE_NAME = "mlflow.db"
ARTIFACTS_DIRECTORY = "mlartifacts"
# SQLite allows one writer at a time; runs from parallel queue workers wait
# for the lock file instead of failing with "database is locked".
LOCK_TIMEOUT_S = 600.0
WRITE_ATTEMPTS = 5
VERSIONED_PACKAGES = ("torch", "dvc", "mlflow", "numpy", "pandas", "scikit-learn")


def repository_root() -> Path:
    """Return the DVC repository whose store receives runs: DVC_ROOT, else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else the SQLite store at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / DATABASE_NAME}"


def sqlite_path(uri: str) -> Path | None:
    """Return the database file of a `sqlite:///` tracking URI, else None."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on a SQLite store for the duration of the block.

    Other stores (an MLflow server) handle concurrency themselves, so no lock
    is taken for them.
    """
    database = sqlite_path(uri)
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


# Tracked files that `dvc repro`, `dvc exp run` or `make report` rewrite. A change in them does not make the
# code of a run differ from its commit.
PIPELINE_WRITTEN = ("params.yaml", "dvc.lock", "metrics/", "plots/", "reports/")


def git_commit(root: Path) -> tuple[str | None, bool | None]:
    """Return (HEAD commit, whether tracked files other than PIPELINE_WRITTEN differ from it), or (None, None)."""
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
    return commit, any(not is_pipeline_written(line) for line in status.splitlines() if line.strip())


def is_pipeline_written(status_line: str) -> bool:
    """Tell whether a `git status --porcelain` line names only PIPELINE_WRITTEN files."""
    # The line is "XY path", or "XY old -> new" for a rename; both names must be pipeline-written.
    names = status_line[3:].split(" -> ")
    return all(name.strip('"').startswith(PIPELINE_WRITTEN) for name in names)


def lock_hashes(lock_file: Path, exclude_stages: tuple[str, ...] = ()) -> dict[str, str]:
    """Map every dependency and output path in dvc.lock to its md5, as `dvc.md5.<path>` tags.

    Pass the running stage in `exclude_stages`: DVC rewrites a stage's lock
    entry only after the stage finishes, so while it runs its entry still
    describes the previous run.
    """
    if not lock_file.is_file():
        return {}
    lock = yaml.safe_load(lock_file.read_text()) or {}
    hashes = {}
    for stage_name, stage in (lock.get("stages") or {}).items():
        if stage_name in exclude_stages:
            continue
        for entry in (stage.get("outs") or []) + (stage.get("deps") or []):
            if "md5" in entry:
                hashes[f"dvc.md5.{_tag_key(entry['path'])}"] = entry["md5"]
    return hashes


def _tag_key(path: str) -> str:
    # MLflow keys allow letters, digits, "_", "-", ".", " " and "/" only.
    return re.sub(r"[^\w\-. /]", "_", path)


def lineage_tags(device: str, running_stage: str = "evaluate") -> dict[str, str]:
    """Tags that trace a run to its code, DVC experiment, artifacts and environment.

    `git_commit` is the commit checked out where the stage runs: for a DVC
    experiment that is its baseline, because DVC commits the experiment only
    after its last stage. `link_experiment_commits` adds `dvc_exp_commit` later.
    """
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
    tags.update(lock_hashes(cwd / "dvc.lock", exclude_stages=(running_stage,)))
    return {key: value for key, value in tags.items() if value != ""}


@dataclass(frozen=True)
class DatasetRecord:
    """A dataset logged as an MLflow run input: a name, a content digest and where it lies."""

    name: str
    digest: str
    source: str
    context: str


def prepared_dataset(directory: Path, lock_file: Path) -> DatasetRecord:
    """Describe the prepared splits by the md5 DVC recorded for them in dvc.lock.

    Without a dvc.lock entry (a stage run by hand) the digest is the md5 of
    the directory's file names and contents, which differs from DVC's.
    """
    digest = lock_hashes(lock_file).get(f"dvc.md5.{_tag_key(str(directory))}")
    if digest is None:
        if not directory.is_dir():
            raise TrackingError(f"{directory} not found; run `dvc repro prepare` before logging the run")
        content = hashlib.md5()
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                content.update(str(path.relative_to(directory)).encode())
                content.update(path.read_bytes())
        digest = content.hexdigest()
    # MLflow 3.x SQL stores declare the dataset digest column 36 characters wide, so DVC's ".dir" suffix goes.
    return DatasetRecord(
        name="fashion-mnist-prepared", digest=digest.removesuffix(".dir"),
        source=(repository_root() / directory).as_uri(), context="evaluation",
    )


def run_name(params: dict[str, Any]) -> str:
    """Return the DVC experiment name when DVC sets one, else a name built from the rule and method."""
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
    datasets: list[DatasetRecord] | None = None,
) -> str:
    """Create one finished MLflow run; return its id.

    The run is written in one short block under the store lock. An exception
    or interruption (Ctrl-C, SIGTERM) inside it ends the run as FAILED or
    KILLED instead of leaving it RUNNING.

    Raises:
        TrackingError: The store cannot be reached or written.
    """
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag, Metric, Param
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    root = repository_root()
    uri = tracking_uri(root)
    with store_lock(uri):
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                # The client opens (and for a new file, creates) the store at construction.
                client = mlflow.MlflowClient(tracking_uri=uri)
                experiment_id = _experiment_id(client, experiment, root, uri)
                run = client.create_run(experiment_id, run_name=run_name, tags=tags)
                break
            except (MlflowException, OperationalError, OSError) as error:
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
            pause_point("mlflow run open")
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
            inputs = []
            for record in datasets or []:
                with warnings.catch_warnings():
                    # MLflow registers its local-file source for two URI schemes and warns that both match.
                    warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
                    source = resolve_dataset_source(record.source)
                dataset = MetaDataset(source, name=record.name, digest=record.digest)
                inputs.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", record.context)]))
            if inputs:
                client.log_inputs(run_id, datasets=inputs)
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
    # NOTE: MLflow keeps this absolute path, so a store copied or moved with
    # the repository still writes artifacts to the old mlartifacts/ folder.
    location = (root / ARTIFACTS_DIRECTORY).as_uri() if sqlite_path(uri) else None
    return client.create_experiment(name, artifact_location=location)


# Stages whose time is the extra cost of RSFT on top of training the GAN.
RSFT_STAGES = ("generate", "score", "reject", "finetune")
COSTED_STAGES = ("prepare", "train_evaluator", "train_gan", *RSFT_STAGES, "finetune_control")
KEY_RSFT_OVERHEAD = "rsft_overhead"
# Written by evaluate and declared under the top-level `metrics:` of dvc.yaml,
# not as a stage output, so its timings stay out of dvc.lock.
COSTS_METRICS = Path("metrics/costs.json")
COST_FIELDS = ("wall_time_s", "peak_memory_mb", "peak_cuda_memory_mb")


def read_stage_costs(stages: tuple[str, ...] = COSTED_STAGES) -> dict[str, dict[str, Any]]:
    """Read costs/<stage>.json of each stage that has one, adding where it was found as "source".

    A stage that DVC skipped or restored from its cache in this workspace
    has no cost file here, which is the case for every upstream stage of a
    queued experiment. Its file in the repository root is used instead,
    because that run produced the reused outputs.
    """
    from rsft.runtime import COSTS_DIR

    folders = [("workspace", Path.cwd() / COSTS_DIR)]
    root = repository_root()
    if root != Path.cwd().resolve():
        folders.append(("repository root", root / COSTS_DIR))

    costs = {}
    for stage in stages:
        for source, folder in folders:
            path = folder / f"{stage}.json"
            if path.is_file():
                costs[stage] = {**json.loads(path.read_text()), "source": source}
                break
        else:
            logger.warning("no cost record %s for stage %s; its cost is not logged", COSTS_DIR / f"{stage}.json", stage)
    # NOTE: a cost file is not tied to the outputs it produced, so after a
    # stage is restored from the run cache its file may describe another run.
    return costs


def rsft_overhead(costs: dict[str, dict[str, Any]]) -> float | None:
    """(generate + score + reject + finetune wall time) / train_gan wall time, or None if a record is missing."""
    if not all(stage in costs for stage in ("train_gan", *RSFT_STAGES)):
        return None
    training = costs["train_gan"]["wall_time_s"]
    if training <= 0:
        return None
    return sum(costs[stage]["wall_time_s"] for stage in RSFT_STAGES) / training


def cost_metrics(costs: dict[str, dict[str, Any]]) -> tuple[dict[str, float], dict[str, str]]:
    """Turn stage costs into MLflow metrics (`cost.<stage>.<field>`, rsft_overhead) and tags (device, source)."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    for stage, cost in costs.items():
        for field in COST_FIELDS:
            if field in cost:
                metrics[f"cost.{stage}.{field}"] = float(cost[field])
        tags[f"cost.{stage}.device"] = str(cost.get("device", "unknown"))
        tags[f"cost.{stage}.source"] = cost["source"]
    overhead = rsft_overhead(costs)
    if overhead is not None:
        metrics[KEY_RSFT_OVERHEAD] = overhead
    return metrics, tags


def experiment_commits(root: Path) -> dict[tuple[str, str], str]:
    """Map (baseline commit, experiment name) to the commit of every finished DVC experiment in `root`."""
    try:
        listing = subprocess.run(
            ["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    commits = {}
    for line in listing.splitlines():
        commit, ref = line.split(" ", 1)
        # DVC names experiment refs refs/exps/<baseline[:2]>/<baseline[2:]>/<name>.
        match = re.fullmatch(r"refs/exps/([0-9a-f]{2})/([0-9a-f]{38})/([^/]+)", ref)
        if match:
            commits[(match[1] + match[2], match[3])] = commit
    return commits


def link_experiment_commits(experiment: str, root: Path | None = None) -> int:
    """Tag each MLflow run of a finished DVC experiment with `dvc_exp_commit`; return how many were tagged.

    A run is matched by its `dvc_exp_name` and `dvc_exp_baseline_rev` tags.
    Runs already tagged are left alone, so calling this again is cheap.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    root = root or repository_root()
    commits = experiment_commits(root)
    if not commits:
        return 0
    uri = tracking_uri(root)
    linked = 0
    with store_lock(uri):
        try:
            client = mlflow.MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                return 0
            for run in client.search_runs([found.experiment_id], filter_string="tags.dvc_exp_name != ''"):
                tags = run.data.tags
                key = (tags.get("dvc_exp_baseline_rev", ""), tags.get("dvc_exp_name", ""))
                if "dvc_exp_commit" not in tags and key in commits:
                    client.set_tag(run.info.run_id, "dvc_exp_commit", commits[key])
                    linked += 1
        except (MlflowException, OSError) as error:
            raise TrackingError(f"cannot tag runs in the MLflow store {uri}: {error}") from None
    return linked
