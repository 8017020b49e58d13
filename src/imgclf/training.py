"""The train stage: a LightningModule on uint8 batches, trained with Lightning, tracked in MLflow."""

import csv
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from torch import nn
from torch.nn import functional as F

from imgclf import tracking
from imgclf.config import Config, TrainConfig
from imgclf.data.datamodule import ImageDataModule
from imgclf.data.normalized import REPORT, load_card
from imgclf.fileio import atomic_path, write_json
from imgclf.models import build_model, checkpoint_record

CURVE_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
RUN_ID_ENV = "IMGCLF_MLFLOW_RUN_ID"  # hands the run to DDP worker processes
# metrics/train.json's keys as MLflow metrics: the best epoch's numbers say so; the rest as they are
BEST = {key: f"best_{key}" for key in ("train_loss", "train_acc", "val_loss", "val_acc")}


class ImageClassifier(L.LightningModule):
    """Cross-entropy training of a network that eats raw uint8 pixels.

    Loss and accuracy are summed in tensors on the device and logged once per epoch:
    a `self.log` per step costs more than the step itself on small images.
    """

    def __init__(self, net: nn.Module, train_config: TrainConfig, record: dict | None = None):
        super().__init__()
        self.net = net
        self.train_config = train_config
        # What export needs to rebuild the network (imgclf.models.checkpoint_record): the checkpoint keeps it.
        self.record = record or {}
        self.sums = {"train": torch.zeros(3), "val": torch.zeros(3)}  # loss * n, correct, n

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            n = labels.new_tensor(len(labels), dtype=torch.float32)
            correct = (logits.argmax(dim=1) == labels).sum().float()
            self.sums[split] += torch.stack([loss.detach() * n, correct, n])
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_fit_start(self) -> None:
        self.sums = {split: torch.zeros(3, device=self.device) for split in self.sums}

    def _log_epoch(self, split: str) -> None:
        loss_sum, correct, n = self.sums[split].tolist()
        self.sums[split].zero_()
        if n:
            self.log(f"{split}_loss", loss_sum / n, prog_bar=True, sync_dist=True)
            self.log(f"{split}_acc", correct / n, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        # The epoch's training batches are done when validation ends: log both splits here so
        # early stopping, checkpointing and the curves all see one epoch's numbers.
        if self.trainer.sanity_checking:
            self.sums["val"].zero_()
            return
        self._log_epoch("train")
        self._log_epoch("val")
        self.log("lr", self.optimizers().param_groups[0]["lr"], sync_dist=True)

    def configure_optimizers(self):
        cfg = self.train_config
        if cfg.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.SGD(
                self.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        if cfg.scheduler == "none":
            return optimizer
        if cfg.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.max_epochs)
        else:
            step = max(1, cfg.max_epochs // 3)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["imgclf"] = self.record


class ModelLine(Callback):
    """One line before training: the network, its size and what it reads."""

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            n = sum(p.numel() for p in module.parameters())
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            body = module.net[-1] if isinstance(module.net, nn.Sequential) else module.net
            print(f"model: {type(body).__name__}, {n:,} parameters ({trainable:,} trainable)", flush=True)


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

    A store write costs milliseconds of CPU, as much as a whole epoch of a small data set on two
    cores, so rows are flushed at most every `flush_seconds` (0: every epoch) and once at the end:
    tracking stays out of the training loop, and a run in progress still shows in the UI.
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
        self.seconds = 0.0  # spent writing: the cost of tracking, reported in metrics/train.json

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


def write_curves(rows: list[dict[str, float]], csv_path: Path, png_path: Path | None) -> None:
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if png_path is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in rows]
    for split in ("train", "val"):
        left.plot(epochs, [row.get(f"{split}_loss") for row in rows], label=split)
        right.plot(epochs, [row.get(f"{split}_acc") for row in rows], label=split)
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    right.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    left.legend()
    right.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def train(
    config: Config,
    data_dir: Path,
    raw_dir: Path,
    params_file: Path,
    checkpoint_out: Path,
    metrics_out: Path,
    curves_out: Path,
    curves_png: Path | None = None,
) -> dict[str, float]:
    """Train the configured model on data/normalized/; write the best checkpoint, metrics, curves.

    Returns the metrics; {} in a DDP worker process, which writes nothing.
    """
    quiet_lightning()
    L.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = ImageDataModule(data_dir, config.train.batch_size, config.seed, augment=config.train.augment)
    card = load_card(data_dir)
    with pipeline_run(config, data_dir, raw_dir) as run_id:
        record = checkpoint_record(card, config.model, run_id)
        module = ImageClassifier(build_model(config.model, card), config.train, record)
        curves = EpochCurves()
        write_points = partial(tracking.log_metric_history, config, run_id)
        to_mlflow = MlflowEpochMetrics(curves, write_points, config.tracking.flush_seconds)
        seconds = fit(config, module, datamodule, [curves, to_mlflow], checkpoint_out)
        if seconds is None:
            return {}
        n_train = len(datamodule.splits["train"][1])
        metrics = summarize(curves.rows, seconds, to_mlflow.seconds, n_train)
        write_json(metrics_out, metrics)
        write_curves(curves.rows, curves_out, curves_png)
        tracking.log_metrics(config, run_id, {BEST.get(k, k): v for k, v in metrics.items()})
        tracking.log_artifacts(config, run_id, [params_file, metrics_out, curves_out])
        if curves_png:
            tracking.log_artifacts(config, run_id, [curves_png], "plots")
    return metrics


def quiet_lightning() -> None:
    """Lightning's banner lines (accelerator availability, tips) are noise in a pipeline log."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch internals, not actionable


@contextmanager
def pipeline_run(config: Config, data_dir: Path, raw_dir: Path) -> Iterator[str]:
    """The pipeline's MLflow run: opened here, or joined in a DDP worker process.

    Lightning starts DDP workers as copies of this process, which see this process's environment:
    RUN_ID_ENV hands them the run while training lasts, and is gone afterwards, so that a second
    training in one process opens a run of its own. The process that opened the run ends it:
    FINISHED, or FAILED or KILLED if training does not finish.
    """
    inherited = os.environ.get(RUN_ID_ENV)
    if inherited:
        yield inherited
        return
    tags = tracking.lineage(config, data_dir, raw_dir)
    run_id = tracking.start_run(config, tags)
    tracking.log_dataset(config, run_id, tags, data_dir / REPORT)
    tracking.log_data_report(config, run_id, data_dir / REPORT)
    os.environ[RUN_ID_ENV] = run_id
    try:
        # FINISHED when training is done; export reopens the run, evaluate adds to it.
        with tracking.run_status(config, run_id, finish=True):
            yield run_id
    finally:
        os.environ.pop(RUN_ID_ENV, None)


def fit(
    config: Config,
    module: ImageClassifier,
    datamodule: ImageDataModule,
    callbacks: list[Callback],
    checkpoint_out: Path,
) -> float | None:
    """Fit with early stopping; move the best checkpoint to checkpoint_out; return fit's seconds.

    None in a DDP worker process: only the main process keeps the checkpoint.
    """
    checkpoint_out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".train.", dir=checkpoint_out.parent.resolve()))
    try:
        best = ModelCheckpoint(dirpath=workdir, filename="best", monitor="val_loss", mode="min")
        datamodule.setup("fit")
        steps_per_epoch = len(datamodule.train_dataloader())
        trainer = L.Trainer(
            max_epochs=config.train.max_epochs,
            accelerator=config.trainer.accelerator,
            devices=config.trainer.devices,
            strategy=config.trainer.strategy,
            precision=config.trainer.precision,
            deterministic=config.trainer.deterministic,
            logger=False,  # metrics go to MLflow through MlflowEpochMetrics, in batches
            callbacks=[
                best,
                EarlyStopping("val_loss", patience=config.train.early_stopping_patience),
                *callbacks,
                ModelLine(),
                progress_callback(steps_per_epoch),
            ],
            default_root_dir=workdir,
            # Lightning's table shows "Total FLOPs: 0" unless it runs a FLOP counter (2 s here):
            # one line of our own says what is trained.
            enable_model_summary=False,
            enable_progress_bar=sys.stdout.isatty(),
        )
        started = time.perf_counter()
        try:
            trainer.fit(module, datamodule=datamodule)
        except SystemExit:
            if trainer.interrupted:  # Lightning turns Ctrl-C and SIGTERM into exit(1)
                raise KeyboardInterrupt from None
            raise
        seconds = time.perf_counter() - started
        if not trainer.is_global_zero:
            return None
        shutil.move(best.best_model_path, checkpoint_out)
        return seconds
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def summarize(rows: list[dict[str, float]], seconds: float, tracking_seconds: float, n_train: int) -> dict:
    """metrics/train.json: the best epoch's numbers (lowest val_loss), and what the fit cost."""
    best = min(rows, key=lambda row: row.get("val_loss", float("inf")))
    return {
        "train_loss": best["train_loss"],
        "train_acc": best["train_acc"],
        "val_loss": best["val_loss"],
        "val_acc": best["val_acc"],
        "best_epoch": best["epoch"],
        "epochs": len(rows),
        "train_seconds": round(seconds, 3),
        "tracking_seconds": round(tracking_seconds, 3),
        "train_images_per_s": round(len(rows) * n_train / seconds, 1),
    }
