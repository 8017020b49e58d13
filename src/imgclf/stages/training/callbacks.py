"""The train stage's callbacks: a line for the model and each epoch, the curves, their way to MLflow."""

import csv
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from torch import nn

from imgclf.fileio import atomic_path

CURVE_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
# A JSON-lines file of the finished epochs, for a program that follows a training while it runs
# (imgclf sweep prunes on it; the epoch lines below are for people and may change). Asked for
# through the environment, not dvc.yaml: an output or an option in the stage's cmd would re-run
# every user's training, and where a trial's progress goes changes no model. DVC passes the
# environment through `dvc exp run`. imgclf.sweep (which may not import the stages) spells the
# name again; tests/code/test_training.py checks that the two agree.
EPOCH_LOG_ENV = "IMGCLF_EPOCH_LOG"


class ModelLine(Callback):
    """One line before training: the network, its size and, under DDP, the processes."""

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            n = sum(p.numel() for p in module.parameters())
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            body = module.net[-1] if isinstance(module.net, nn.Sequential) else module.net
            line = f"model: {type(body).__name__}, {n:,} parameters ({trainable:,} trainable)"
            if trainer.world_size > 1:
                batch, world = module.train_config.batch_size, trainer.world_size
                line += (
                    f"; DDP: {world} processes ({trainer.num_devices} per node x {trainer.num_nodes} "
                    f"nodes), batches of {batch} per process, {batch * world} per step"
                )
            print(line, flush=True)


class EpochLines(Callback):
    """One line per epoch, for logs that are not a terminal (CI, `dvc queue logs`)."""

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        shown = "  ".join(
            f"{name} {float(metrics[name]):.4f}" for name in CURVE_FIELDS[1:5] if name in metrics
        )
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {shown}", flush=True)


def progress_callback(steps_per_epoch: int) -> Callback:
    """A progress bar on a terminal; sparse lines otherwise, so CI logs stay readable."""
    if sys.stdout.isatty():
        return TQDMProgressBar(refresh_rate=max(1, steps_per_epoch // 10))
    return EpochLines()


class EpochCurves(Callback):
    """Keeps one row per finished epoch for plots/train_curves.csv; global rank 0 also appends it
    to `epoch_log` (one JSON object a line, flushed as the epoch ends) when one is given."""

    def __init__(self, epoch_log: Path | None = None):
        self.rows: list[dict[str, float]] = []
        self.epoch_log = epoch_log  # not `log`: the Trainer sets that on every callback

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1}
        for field in CURVE_FIELDS[1:]:
            if field in metrics:
                row[field] = round(float(metrics[field]), 6)
        self.rows.append(row)
        if self.epoch_log is not None and trainer.is_global_zero:
            with self.epoch_log.open("a", encoding="utf-8") as f:  # closed, so flushed, line by line
                f.write(json.dumps(row) + "\n")


def epoch_log_path(environ: Mapping[str, str]) -> Path | None:
    """The JSON-lines file of finished epochs that $IMGCLF_EPOCH_LOG asks for; None: none."""
    return Path(environ[EPOCH_LOG_ENV]) if environ.get(EPOCH_LOG_ENV) else None


class MlflowEpochMetrics(Callback):
    """Sends the per-epoch rows of `EpochCurves` to the MLflow run in batches.

    The tracking process makes the writes; each still costs milliseconds of CPU there, as much as
    a whole epoch of a small data set on two cores, so rows are sent at most every `flush_seconds`
    (0: every epoch) and once at the end: tracking stays out of the training loop's way, and a run
    in progress still shows in the UI.
    """

    def __init__(
        self,
        curves: "EpochCurves",
        write: Callable[[list[tuple[str, float, int]]], None],
        flush_seconds: float,
    ):
        self.curves, self.write, self.flush_seconds = curves, write, flush_seconds
        self.sent = 0
        self.last_flush = time.monotonic()
        self.seconds = 0.0  # spent sending: tracking's cost to the fit, reported in metrics/train.json

    def flush(self) -> None:
        rows = self.curves.rows[self.sent :]
        points = [(key, value, row["epoch"]) for row in rows for key, value in row.items() if key != "epoch"]
        if points:
            started = time.perf_counter()
            self.write(points)
            self.seconds += time.perf_counter() - started
        self.sent += len(rows)
        self.last_flush = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero and time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.flush()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            self.flush()  # the epochs that did finish belong in the run


def write_curves(rows: list[dict[str, float]], csv_path: Path) -> None:
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
