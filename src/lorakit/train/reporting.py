"""Where else a run's metrics go: TensorBoard and MLflow, as local files under the run's directory.

`fit` writes each `metrics.jsonl` line (step, epoch, loss, lr, grad_norm, tokens_per_s, seconds and,
on evaluation steps, `eval_*`) and hands the same record to every reporter `TrainConfig.report_to`
names, on rank 0 only. A reporter is two calls, `log(record)` and `close(status)`:

- `tensorboard` (the `tensorboard` extra): event files in `<out>/tensorboard/`, each value a scalar
  under its metrics.jsonl name at the record's step, written with `torch.utils.tensorboard`
  (`tensorboard --logdir <out>/tensorboard`);
- `mlflow` (the `mlflow` extra): a tracking store in `<out>/mlflow.db`, experiment `lorakit`, one
  run named after `<out>` with the TrainConfig as its parameters and each value a metric at the
  record's step (`mlflow ui --backend-store-uri sqlite:///<out>/mlflow.db`).

MLflow 3 keeps its plain-file store (`file:./mlruns`) in maintenance mode and refuses it unless an
environment variable opts in, so the local store is SQLite, the backend MLflow recommends; nothing
is sent anywhere. Both are flushed after every record, as metrics.jsonl is. A resumed run starts its
reporters over from the metrics.jsonl lines the checkpoint kept: the TensorBoard event files are
written again, and the MLflow store gets a new run holding those lines (the earlier runs of the
same directory are marked deleted), so what each shows is metrics.jsonl, line for line.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from lorakit.extras import require, require_extra
from lorakit.train.config import REPORTERS

__all__ = [
    "MLFLOW_EXPERIMENT",
    "MLFLOW_STORE",
    "TENSORBOARD_DIR",
    "Reporter",
    "check_reporters",
    "open_reporters",
]

TENSORBOARD_DIR = "tensorboard"
MLFLOW_STORE = "mlflow.db"
MLFLOW_EXPERIMENT = "lorakit"


class Reporter(Protocol):
    """Something that receives each metrics record of a run."""

    def log(self, record: Mapping[str, Any]) -> None:
        """Write one metrics.jsonl record (its `step` and values) and flush it."""

    def close(self, status: str) -> None:
        """Finish: `status` is `FINISHED`, `KILLED` (Ctrl-C) or `FAILED`."""


def check_reporters(names: Sequence[str]) -> None:
    """Check, without importing them, that the extras of the named reporters are installed.

    Raises:
        MissingExtraError: naming the missing package and the extra that installs it.
    """
    for name in names:
        require_extra(name, f"--report-to {name}")


def open_reporters(
    names: Sequence[str], out: Path, *, history: Sequence[Mapping[str, Any]] = (), params: Mapping[str, Any]
) -> list[Reporter]:
    """Start the named reporters for a run in `out`, each first given `history`.

    Args:
        names: from `REPORTERS`.
        out: the run's directory.
        history: the metrics.jsonl records already written (a resumed run's kept lines), oldest first.
        params: the run's settings (MLflow's parameters).

    Returns:
        One reporter per name, in that order.

    Raises:
        MissingExtraError: a reporter's extra is not installed.
    """
    reporters: list[Reporter] = []
    try:
        for name in names:
            if name not in REPORTERS:
                raise ValueError(f"unknown reporter {name!r}; choose from {', '.join(REPORTERS)}")
            reporter = _TensorBoard(out) if name == "tensorboard" else _MLflow(out, params)
            reporters.append(reporter)
            for record in history:
                reporter.log(record)
    except BaseException:
        for reporter in reporters:
            reporter.close("FAILED")
        raise
    return reporters


def _values(record: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """(name, value) of every number in a record but its step."""
    for key, value in record.items():
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
            yield key, float(value)


class _TensorBoard:
    """Scalars in `<out>/tensorboard` (torch.utils.tensorboard's writer, from the `tensorboard` extra)."""

    def __init__(self, out: Path) -> None:
        require("tensorboard", "tensorboard", "--report-to tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        directory = out / TENSORBOARD_DIR
        # A resumed run writes the kept lines again: earlier event files would repeat them, and hold
        # the steps past the checkpoint that the resumed run recomputes.
        for old in directory.glob("events.out.tfevents.*") if directory.is_dir() else []:
            old.unlink()
        self.writer = SummaryWriter(log_dir=str(directory))

    def log(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for key, value in _values(record):
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Raise the named loggers to WARNING for the block (MLflow's and alembic's store set-up lines)."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


class _MLflow:
    """One MLflow run in the SQLite store `<out>/mlflow.db` (the `mlflow` extra)."""

    def __init__(self, out: Path, params: Mapping[str, Any]) -> None:
        require("mlflow", "mlflow", "--report-to mlflow")
        from mlflow.entities import Param, ViewType
        from mlflow.tracking import MlflowClient

        root = out.resolve()
        with _quiet("mlflow", "alembic"):
            self.client = MlflowClient(tracking_uri=f"sqlite:///{root / MLFLOW_STORE}")
            experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
            if experiment is None:
                experiment_id = self.client.create_experiment(
                    MLFLOW_EXPERIMENT, artifact_location=(root / "mlartifacts").as_uri()
                )
            else:
                experiment_id = experiment.experiment_id
        # Earlier runs of this directory (before a resume or --overwrite) give way to this one,
        # which holds the history it continues.
        for run in self.client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY):
            self.client.delete_run(run.info.run_id)
        self.run_id = self.client.create_run(experiment_id, run_name=root.name).info.run_id
        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=items[start : start + 100], synchronous=True)

    def log(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record["step"])
        metrics = [Metric(key, value, now, step) for key, value in _values(record)]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
