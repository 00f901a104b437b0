"""The threshold trade-off report: acceptance rate, FID, precision and recall per threshold, from MLflow.

    python -m rsft.report [--experiment rsft] [--output reports]

reads the finished runs of an MLflow experiment (the store of rsft.tracking),
keeps the newest run per setting, and writes to the output folder:

- tradeoff.csv and tradeoff.md: one row per run, sorted by the params that vary;
- seeds.csv and seeds.md: one row per setting with the mean and sample standard
  deviation over `finetune.seed` of FID, precision, recall and coverage of the
  fine-tuned generator, the control and rejection at inference, and of the
  paired `fid_gain_vs_control`;
- tradeoff.png: acceptance rate, FID, precision and recall of the fine-tuned
  generator against the threshold, one line per setting of the other varied
  params (seed means, with error bars of one standard deviation when a setting
  has several seeds). The baseline (trained generator) and the control
  (trained longer on real data) are dashed reference lines at their median
  over all runs, so settings with other fine-tuning budgets share one control
  line; seeds.csv pairs each setting with its own control. A last panel plots
  FID against acceptance rate for every rule.

Only runs that start from the same trained GAN (the `dvc.md5.data/gan` tag)
are comparable, so the report keeps those of the newest run's GAN. A setting
is one combination of every logged param. Of several runs with the same
params, the newest is kept. Before it reads the runs it tags the runs of
finished DVC experiments with their commit (see
rsft.tracking.link_experiment_commits).
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
# The param whose runs seeds.csv averages over: it changes nothing upstream of fine-tuning.
SEED_PARAM = "finetune.seed"
# Shown first in the tables when present, then the other params that vary.
LEADING_PARAMS = ("reject.rule", "finetune.method", "threshold")
SEED_METRICS = ("acceptance_rate", "fid_finetuned", "fid_gain_vs_control", "precision_finetuned", "recall_finetuned",
                "coverage_finetuned", "fid_control", "precision_control", "recall_control", "coverage_control",
                "fid_rejection", "precision_rejection", "recall_rejection", "coverage_rejection", "fid_baseline",
                "recall_baseline", "coverage_baseline")
# The columns of seeds.md; seeds.csv has every metric of SEED_METRICS.
SEED_TABLE_METRICS = ("acceptance_rate", "fid_finetuned", "fid_gain_vs_control", "precision_finetuned",
                      "recall_finetuned", "coverage_finetuned", "fid_control", "recall_control", "fid_rejection",
                      "recall_rejection")
PANELS = (("acceptance_rate", "acceptance rate"), ("fid", "FID (lower is better)"),
          ("precision", "precision"), ("recall", "recall"))
LEGEND_COLUMNS = 3
# The columns of tradeoff.csv and tradeoff.md after run_name and the varied params.
TABLE_COLUMNS = ("acceptance_rate", "fid_finetuned", "precision_finetuned", "recall_finetuned",
                 "coverage_finetuned", "fid_baseline", "fid_control", "fid_gain_vs_control", "rsft_overhead",
                 "dvc_exp_name", "git_commit", "dvc_exp_commit", "run_id")


def runs_to_frame(runs: list[Any]) -> tuple[pd.DataFrame, list[str]]:
    """Build one row per MLflow run (params as floats where numeric, metrics, lineage tags) and list the params."""
    rows = []
    params: set[str] = set()
    for run in runs:
        params.update(run.data.params)
        row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name,
                               "start_time": run.info.start_time}
        for key, value in run.data.params.items():
            row[key] = _param_value(value)
        row.update(run.data.metrics)
        for key in ("git_commit", "dvc_exp_name", "dvc_exp_commit", GAN_TAG):
            row[key] = run.data.tags.get(key, "")
        rows.append(row)
    frame = pd.DataFrame(rows)
    for key in params:
        # A param that is a number in some runs and text in others would break sorting and grouping.
        kinds = {isinstance(value, str) for value in frame[key].dropna()}
        if len(kinds) > 1:
            frame[key] = frame[key].map(lambda value: value if pd.isna(value) else str(value))
    return frame, sorted(params)


def _param_value(text: str) -> float | str:
    # MLflow returns params as strings. Numeric ones become floats, so threshold "1" and "1.0" are one setting.
    try:
        return float(text)
    except ValueError:
        return text


def varying_params(frame: pd.DataFrame, params: list[str]) -> list[str]:
    """List the params with more than one value among the runs, LEADING_PARAMS first."""
    varying = [key for key in params if key in frame.columns and frame[key].nunique(dropna=False) > 1]
    leading = [key for key in LEADING_PARAMS if key in varying]
    return leading + [key for key in varying if key not in leading]


def select_comparable(frame: pd.DataFrame, params: list[str]) -> pd.DataFrame:
    """Keep the runs of the newest run's GAN, and the newest run of each setting, sorted by the varied params."""
    newest_gan = frame.sort_values("start_time").iloc[-1][GAN_TAG]
    same_gan = frame[frame[GAN_TAG] == newest_gan]
    if len(same_gan) < len(frame):
        logger.warning("left out %d run(s) trained from another GAN than the newest run's (%s)",
                       len(frame) - len(same_gan), newest_gan or "unknown")
    settings = [key for key in params if key in same_gan.columns]
    newest = same_gan.sort_values("start_time").drop_duplicates(settings, keep="last")
    order = [key for key in LEADING_PARAMS if key in newest.columns]
    order += [key for key in varying_params(newest, params) if key not in order]
    return newest.sort_values(order).reset_index(drop=True) if order else newest.reset_index(drop=True)


def summarize_seeds(frame: pd.DataFrame, params: list[str]) -> pd.DataFrame:
    """Average the runs of each setting over `finetune.seed`: one row per setting.

    The row has the setting's varied params, `num_seeds`, the seeds, and
    `<metric>_mean` and `<metric>_sd` (sample standard deviation, NaN for a
    single seed) of every metric in SEED_METRICS that the runs logged.
    """
    keys = [key for key in varying_params(frame, params) if key != SEED_PARAM]
    metrics = [metric for metric in SEED_METRICS if metric in frame.columns]
    groups = frame.groupby(keys, dropna=False, sort=True) if keys else [((), frame)]
    rows = []
    for values, runs in groups:
        values = values if isinstance(values, tuple) else (values,)
        row: dict[str, Any] = dict(zip(keys, values))
        row["num_seeds"] = len(runs)
        if SEED_PARAM in runs.columns:
            row["seeds"] = " ".join(f"{seed:g}" if isinstance(seed, float) else str(seed)
                                    for seed in sorted(runs[SEED_PARAM]))
        for metric in metrics:
            row[f"{metric}_mean"] = runs[metric].mean()
            row[f"{metric}_sd"] = runs[metric].std(ddof=1) if len(runs) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def seeds_to_markdown(summary: pd.DataFrame) -> str:
    """Format the seed summary as a Markdown table of `mean ± sd` cells."""
    keys = [column for column in summary.columns if not column.endswith(("_mean", "_sd")) and column != "seeds"]
    metrics = [metric for metric in SEED_TABLE_METRICS if f"{metric}_mean" in summary.columns]
    lines = ["| " + " | ".join(keys + metrics) + " |", "|" + "---|" * (len(keys) + len(metrics))]
    for _, row in summary.iterrows():
        cells = [_format_cell(row[key]) for key in keys]
        for metric in metrics:
            mean, sd = row[f"{metric}_mean"], row[f"{metric}_sd"]
            # Equal values can give a rounding-error sd such as 1e-16; print it as 0.
            sd = 0.0 if not pd.isna(sd) and sd <= 1e-9 * abs(mean) else sd
            cells.append(_format_cell(mean) if pd.isna(sd) else f"{mean:.4g} ± {sd:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format_cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)


def table_columns(frame: pd.DataFrame, params: list[str]) -> list[str]:
    """List the table columns: run_name, the leading and the varied params, then TABLE_COLUMNS."""
    keys = [key for key in LEADING_PARAMS if key in frame.columns]
    keys += [key for key in varying_params(frame, params) if key not in keys]
    return ["run_name", *keys, *(column for column in TABLE_COLUMNS if column in frame.columns)]


def frame_to_markdown(frame: pd.DataFrame, columns: list[str]) -> str:
    """Format the columns as a Markdown table, numbers to four significant digits."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame[columns].iterrows():
        cells = [_format_cell(value) for value in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tradeoff_figure(frame: pd.DataFrame, params: list[str]):
    """Plot the trade-off panels and return the matplotlib figure."""
    from rsft.plots import plt

    by_threshold = frame[frame["reject.rule"] == "threshold"]
    # One line per combination of the other varied params; seeds are averaged.
    line_keys = [key for key in varying_params(by_threshold, params)
                 if key not in ("threshold", "reject.rule", SEED_PARAM)]
    lines = list(by_threshold.groupby(line_keys, dropna=False)) if line_keys else [((), by_threshold)]
    # The legend goes below the panels, LEGEND_COLUMNS entries per row, each row adding to the figure's height.
    legend_rows = -(-(len(lines) + 2) // LEGEND_COLUMNS)
    legend_height = 0.25 * legend_rows + 0.2
    figure, axes = plt.subplots(1, len(PANELS) + 1, figsize=(4 * (len(PANELS) + 1), 3.6 + legend_height))

    for axis, (key, label) in zip(axes, PANELS):
        column = key if key == "acceptance_rate" else f"{key}_finetuned"
        for values, runs in lines:
            values = values if isinstance(values, tuple) else (values,)
            name = ", ".join(f"{_short_key(k)}={_format_cell(v)}" for k, v in zip(line_keys, values))
            points = runs.groupby("threshold")[column].agg(["mean", "std"]).sort_index()
            axis.errorbar(points.index, points["mean"], yerr=points["std"].fillna(0.0), marker="o", capsize=3,
                          label=f"RSFT ({name})" if name else "RSFT")
        if key != "acceptance_rate":
            for reference, style in (("baseline", "gray"), ("control", "black")):
                if f"{key}_{reference}" in frame.columns:
                    axis.axhline(frame[f"{key}_{reference}"].median(), color=style, linestyle="--", label=reference)
        axis.set_xlabel("threshold")
        axis.set_title(label)
    handles, labels = axes[1].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=LEGEND_COLUMNS, fontsize="small", frameon=False)

    # Every rule on one axis: FID of the fine-tuned generator against the fraction of fakes kept.
    axis = axes[-1]
    for (rule, method), runs in frame.groupby(["reject.rule", "finetune.method"]):
        axis.scatter(runs["acceptance_rate"], runs["fid_finetuned"], label=f"{rule}, {method}")
    axis.set_xlabel("acceptance rate")
    axis.set_title("FID vs acceptance rate")
    axis.legend(fontsize="small")

    figure.tight_layout(rect=(0.0, legend_height / (3.6 + legend_height), 1.0, 1.0))
    return figure


def _short_key(key: str) -> str:
    # "finetune.method" reads as "method" in a legend; a top-level key stays as it is.
    return key.rsplit(".", 1)[-1]


def write_report(experiment: str, output: Path, link: bool = True) -> pd.DataFrame:
    """Read the experiment's finished runs and write tradeoff.csv, tradeoff.md and tradeoff.png.

    Raises:
        TrackingError: The store cannot be read, or the experiment has no finished run.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    from rsft.plots import save_figure

    root = tracking.repository_root()
    uri = tracking.tracking_uri(root)
    database = tracking.sqlite_path(uri)
    if database is not None and not database.is_file():
        raise TrackingError(f"no MLflow store at {database}; run `dvc repro` first, or set MLFLOW_TRACKING_URI")
    if database is not None:
        _check_sqlite_store(database)
    if link:
        linked = tracking.link_experiment_commits(experiment, root)
        logger.info("tagged %d run(s) with their DVC experiment commit", linked)

    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        runs = [] if found is None else client.search_runs(
            [found.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=50000)
    except (MlflowException, SQLAlchemyError, OSError) as error:
        raise TrackingError(f"cannot read the MLflow store {uri}: {error}") from None
    if found is None:
        names = ", ".join(sorted(item.name for item in client.search_experiments())) or "none"
        raise TrackingError(
            f"no experiment named {experiment!r} in {uri} (found: {names}); pass --experiment with the name set in "
            f"params.yaml tracking.experiment"
        )
    if not runs:
        raise TrackingError(
            f"experiment {experiment!r} in {uri} has no finished run; run `dvc repro` or `dvc exp run` first, "
            f"or pass --experiment with the name set in params.yaml tracking.experiment"
        )

    frame, params = runs_to_frame(runs)
    frame = select_comparable(frame, params)
    summary = summarize_seeds(frame, params)
    columns = table_columns(frame, params)
    try:
        output.mkdir(parents=True, exist_ok=True)
        with atomic_path(output / "tradeoff.csv") as temporary:
            frame[columns].to_csv(temporary, index=False)
        with atomic_path(output / "tradeoff.md") as temporary:
            temporary.write_text(frame_to_markdown(frame, columns))
        with atomic_path(output / "seeds.csv") as temporary:
            summary.to_csv(temporary, index=False)
        with atomic_path(output / "seeds.md") as temporary:
            temporary.write_text(seeds_to_markdown(summary))
        save_figure(tradeoff_figure(frame, params), output / "tradeoff.png")
    except OSError as error:
        raise RsftError(f"cannot write the report to {output}: {error}; pass --output a writable folder") from None
    logger.info("wrote the trade-off of %d run(s) in %d setting(s) to %s", len(frame), len(summary), output)
    return frame


def _check_sqlite_store(database: Path) -> None:
    # MLflow would write its schema into an empty file and fail with a traceback on any other file.
    with open(database, "rb") as stream:
        header = stream.read(16)
    if header != b"SQLite format 3\x00":
        state = "empty" if not header else "not an SQLite database"
        raise TrackingError(
            f"{database} is {state}, so it is not an MLflow store; run `dvc repro` to create one, or set "
            f"MLFLOW_TRACKING_URI to the store to read"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rsft.report", description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="rsft", help="MLflow experiment to read (default: rsft)")
    parser.add_argument("--output", type=Path, default=Path("reports"),
                        help="folder for tradeoff.{csv,md,png} and seeds.{csv,md} (default: reports)")
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
