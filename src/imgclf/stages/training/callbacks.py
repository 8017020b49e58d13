"""The train stage's callbacks: a line for the model and each epoch, the curves, their way to MLflow."""

import csv
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from torch import nn

from imgclf.fileio import atomic_path

CURVE_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


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
    """Keeps one row per finished epoch for plots/train_curves.csv."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1}
        for field in CURVE_FIELDS[1:]:
            if field in metrics:
                row[field] = round(float(metrics[field]), 6)
        self.rows.append(row)


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
