"""The threshold trade-off report: acceptance rate, FID, precision and recall per threshold, from MLflow.

    python -m rsft.report [--experiment rsft] [--output reports]

reads the finished runs of an MLflow experiment (the store of rsft.tracking),
keeps the newest run per setting, and writes to the output folder:

- tradeoff.csv and tradeoff.md: one row per run, sorted by rule, method and threshold;
- tradeoff.png: acceptance rate, FID, precision and recall of the fine-tuned
  generator against the threshold, one line per fine-tuning method. The
  baseline (trained generator) and control (fine-tuned on unfiltered fakes)
  are dashed reference lines. A last panel plots FID against acceptance rate
  for every rule.

Only runs that start from the same trained GAN (the `dvc.md5.data/gan` tag)
are comparable; the report keeps those of the newest run's GAN. Before it
reads the runs it tags the runs of finished DVC experiments with their commit
(see rsft.tracking.link_experiment_commits).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsft import tracking
from rsft.errors import RsftError, TrackingError
from rsft.runtime import atomic_path

logger = logging.getLogger(__name__)

GAN_TAG = "dvc.md5.data/gan"
# The columns that define one setting. Of several runs with equal settings the newest is kept.
SETTING_COLUMNS = ("reject.rule", "finetune.method", "threshold", "reject.keep_fraction",
                   "reject.drs_gamma_percentile", "score.calibration")
PANELS = (("acceptance_rate", "acceptance rate"), ("fid", "FID (lower is better)"),
          ("precision", "precision"), ("recall", "recall"))
TABLE_COLUMNS = ("run_name", "reject.rule", "finetune.method", "threshold", "acceptance_rate",
                 "fid_finetuned", "precision_finetuned", "recall_finetuned", "fid_baseline", "fid_control",
                 "rsft_overhead", "dvc_exp_name", "git_commit", "dvc_exp_commit", "run_id")


def runs_to_frame(runs: list[Any]) -> pd.DataFrame:
    """Build one row per MLflow run: its params (floats where numeric), metrics and lineage tags."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name,
                               "start_time": run.info.start_time}
        for key, value in run.data.params.items():
            row[key] = _param_value(value)
        row.update(run.data.metrics)
        for key in ("git_commit", "dvc_exp_name", "dvc_exp_commit", GAN_TAG):
            row[key] = run.data.tags.get(key, "")
        rows.append(row)
    return pd.DataFrame(rows)


def _param_value(text: str) -> float | str:
    # MLflow returns params as strings. Numeric ones become floats, so threshold "1" and "1.0" are one setting.
    try:
        return float(text)
    except ValueError:
        return text


def select_comparable(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep the runs of the newest run's GAN, and the newest run of each setting, sorted for reading."""
    newest_gan = frame.sort_values("start_time").iloc[-1][GAN_TAG]
    same_gan = frame[frame[GAN_TAG] == newest_gan]
    if len(same_gan) < len(frame):
        logger.warning("left out %d run(s) trained from another GAN than the newest run's (%s)",
                       len(frame) - len(same_gan), newest_gan or "unknown")
    settings = [column for column in SETTING_COLUMNS if column in same_gan.columns]
    newest = same_gan.sort_values("start_time").drop_duplicates(settings, keep="last")
    return newest.sort_values(settings).reset_index(drop=True)


def frame_to_markdown(frame: pd.DataFrame) -> str:
    """Format the report columns as a Markdown table, numbers to four significant digits."""
    columns = [column for column in TABLE_COLUMNS if column in frame.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame[columns].iterrows():
        cells = [f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value) for value in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tradeoff_figure(frame: pd.DataFrame):
    """Plot the trade-off panels and return the matplotlib figure."""
    from rsft.plots import plt

    figure, axes = plt.subplots(1, len(PANELS) + 1, figsize=(4 * (len(PANELS) + 1), 3.6))
    by_threshold = frame[frame["reject.rule"] == "threshold"]

    for axis, (key, label) in zip(axes, PANELS):
        column = key if key == "acceptance_rate" else f"{key}_finetuned"
        for method, runs in by_threshold.groupby("finetune.method"):
            runs = runs.sort_values("threshold")
            axis.plot(runs["threshold"], runs[column], marker="o", label=f"RSFT ({method})")
        if key != "acceptance_rate":
            for reference, style in (("baseline", "gray"), ("control", "black")):
                if f"{key}_{reference}" in frame.columns:
                    axis.axhline(frame[f"{key}_{reference}"].median(), color=style, linestyle="--", label=reference)
        axis.set_xlabel("threshold")
        axis.set_title(label)
    axes[1].legend(fontsize="small")

    # Every rule on one axis: FID of the fine-tuned generator against the fraction of fakes kept.
    axis = axes[-1]
    for (rule, method), runs in frame.groupby(["reject.rule", "finetune.method"]):
        axis.scatter(runs["acceptance_rate"], runs["fid_finetuned"], label=f"{rule}, {method}")
    axis.set_xlabel("acceptance rate")
    axis.set_title("FID vs acceptance rate")
    axis.legend(fontsize="small")

    figure.tight_layout()
    return figure


def write_report(experiment: str, output: Path, link: bool = True) -> pd.DataFrame:
    """Read the experiment's finished runs and write tradeoff.csv, tradeoff.md and tradeoff.png.

    Raises:
        TrackingError: The store cannot be read, or the experiment has no finished run.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from rsft.plots import save_figure

    root = tracking.repository_root()
    uri = tracking.tracking_uri(root)
    database = tracking.sqlite_path(uri)
    if database is not None and not database.is_file():
        raise TrackingError(f"no MLflow store at {database}; run `dvc repro` first, or set MLFLOW_TRACKING_URI")
    if link:
        linked = tracking.link_experiment_commits(experiment, root)
        logger.info("tagged %d run(s) with their DVC experiment commit", linked)

    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        runs = [] if found is None else client.search_runs(
            [found.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=50000)
    except (MlflowException, OSError) as error:
        raise TrackingError(f"cannot read the MLflow store {uri}: {error}") from None
    if not runs:
        raise TrackingError(
            f"experiment {experiment!r} in {uri} has no finished run; run `dvc repro` or `dvc exp run` first, "
            f"or pass --experiment with the name set in params.yaml tracking.experiment"
        )

    frame = select_comparable(runs_to_frame(runs))
    output.mkdir(parents=True, exist_ok=True)
    columns = [column for column in TABLE_COLUMNS if column in frame.columns]
    with atomic_path(output / "tradeoff.csv") as temporary:
        frame[columns].to_csv(temporary, index=False)
    with atomic_path(output / "tradeoff.md") as temporary:
        temporary.write_text(frame_to_markdown(frame))
    save_figure(tradeoff_figure(frame), output / "tradeoff.png")
    logger.info("wrote the trade-off of %d run(s) to %s", len(frame), output)
    return frame


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rsft.report", description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="rsft", help="MLflow experiment to read (default: rsft)")
    parser.add_argument("--output", type=Path, default=Path("reports"),
                        help="folder for tradeoff.csv, tradeoff.md and tradeoff.png (default: reports)")
    parser.add_argument("--no-link", action="store_true",
                        help="do not tag runs with the commit of their DVC experiment")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        write_report(arguments.experiment, arguments.output, link=not arguments.no_link)
    except RsftError as error:
        print(f"error in report: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
