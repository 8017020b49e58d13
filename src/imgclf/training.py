"""The train stage: a LightningModule on uint8 batches, trained with Lightning, tracked in MLflow."""

import csv
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from torch import nn
from torch.nn import functional as F

from imgclf.config import Config, TrainConfig, TrainerConfig
from imgclf.data.datamodule import ImageDataModule
from imgclf.data.normalized import REPORT, load_card
from imgclf.errors import ConfigError
from imgclf.fileio import atomic_path, write_json
from imgclf.models import build_model, checkpoint_record
from imgclf.tracker import Tracker

CURVE_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
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
        if self.train_config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = self(images)
        log_probs = F.log_softmax(logits.float(), dim=1)  # float: bf16 autocast leaves bf16 logits
        loss = F.nll_loss(log_probs, labels)  # plain cross-entropy, the loss the curves report
        with torch.no_grad():
            n = labels.new_tensor(len(labels), dtype=torch.float32)
            correct = (logits.argmax(dim=1) == labels).sum().float()
            self.sums[split] += torch.stack([loss.detach() * n, correct, n])
        smoothing = self.train_config.label_smoothing
        if split == "train" and smoothing:
            # The target keeps 1 - smoothing on the label and spreads `smoothing` over all classes,
            # as F.cross_entropy(label_smoothing=...) does.
            return (1 - smoothing) * loss - smoothing * log_probs.mean(dim=1).mean()
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def setup(self, stage: str) -> None:
        if self.train_config.channels_last:  # before the optimizer is made: its state follows the weights
            self.net.to(memory_format=torch.channels_last)

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
        if cfg.scheduler == "onecycle":
            # Smith and Topin (2019): up to `lr` in the first 30 % of the steps, then down to lr / 25e4;
            # Adam's beta1 (SGD's momentum) moves between 0.95 and 0.85 the other way.
            steps = self.trainer.estimated_stepping_batches
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if cfg.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.max_epochs)
        else:
            step = max(1, cfg.max_epochs // 3)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["imgclf"] = self.record


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


def train(
    config: Config,
    data_dir: Path,
    raw_dir: Path,
    params_file: Path,
    checkpoint_out: Path,
    metrics_out: Path,
    curves_out: Path,
    curves_png: Path | None,
    tracker: Tracker,
) -> dict[str, float]:
    """Train the configured model on data/normalized/; write the best checkpoint, metrics, curves.

    Under DDP every process runs this; global rank 0 alone opens the MLflow run (through
    `tracker`), hashes the data and writes the outputs. Returns the metrics; {} in every other
    process, which writes nothing.
    """
    quiet_lightning()
    devices = processes_per_node(config.trainer)
    check_launch(config.trainer, devices, os.environ)  # before any work: a wrong launch trains nothing
    L.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = ImageDataModule(data_dir, config.train.batch_size, config.seed, augment=config.train.augment)
    card = load_card(data_dir)
    net = build_model(config.model, card)
    curves = EpochCurves()
    to_mlflow = MlflowEpochMetrics(curves, tracker.log_metric_history, config.tracking.flush_seconds)
    # Lightning writes checkpoints from global rank 0 only, into rank 0's folder (it broadcasts the
    # path). A system temporary folder, not one beside the outputs: no other process, on this node
    # or another, creates anything in the checkout; rank 0 copies the best one into place.
    with tempfile.TemporaryDirectory(prefix="imgclf-train-") as workdir:
        best = ModelCheckpoint(dirpath=workdir, filename="best", monitor="val_loss", mode="min")
        trainer = make_trainer(config, devices, [best, curves, to_mlflow], Path(workdir), datamodule)
        if not trainer.is_global_zero:  # known once the Trainer has read the launch environment
            tracker.discard()
            fit(trainer, ImageClassifier(net, config.train), datamodule)
            return {}
        run_id = tracker.open_run(data_dir, raw_dir, data_dir / REPORT).result()
        # FINISHED when training is done; export continues the run, evaluate adds to it.
        with tracker.run_status():
            module = ImageClassifier(net, config.train, checkpoint_record(card, config.model, run_id))
            seconds = fit(trainer, module, datamodule)
            with atomic_path(checkpoint_out) as tmp:
                shutil.copyfile(best.best_model_path, tmp)
            n_train = len(datamodule.splits["train"][1])
            metrics = summarize(curves.rows, seconds, to_mlflow.seconds, n_train, trainer.world_size)
            write_json(metrics_out, metrics)
            write_curves(curves.rows, curves_out)
            tracker.log_metrics({BEST.get(k, k): v for k, v in metrics.items()})
            tracker.log_artifacts([params_file, metrics_out, curves_out])
            if curves_png:
                tracker.draw_curves(curves.rows, curves_png)
                tracker.log_artifacts([curves_png], "plots")
    return metrics


def quiet_lightning() -> None:
    """Lightning's banner lines (accelerator availability, tips) are noise in a pipeline log."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch internals, not actionable


def processes_per_node(trainer: TrainerConfig) -> int:
    """trainer.devices as a number of processes on this machine.

    `auto` is Lightning's count (every GPU; one process on CPU), except on CPU with strategy ddp:
    there it is one process per CPU core this process may use, as conf/trainer/ddp.yaml promises,
    where Lightning's count would make DDP a single process. Lightning gives each of them
    cores / processes threads.
    """
    if trainer.devices != "auto":
        return trainer.devices
    if trainer.accelerator != "cpu":
        for accelerator in (MPSAccelerator, CUDAAccelerator):  # Lightning's order for `auto`
            if accelerator.is_available():
                return accelerator.auto_device_count()
        if trainer.accelerator != "auto":
            return 1  # no such device here: Lightning says so when it starts
    if trainer.strategy == "ddp":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1


def check_launch(trainer: TrainerConfig, devices: int, environ: Mapping[str, str]) -> None:
    """ConfigError if the launch environment disagrees with the config on the processes.

    A launcher (torchrun, another node's NODE_RANK, a scheduler) says how many processes take part;
    Lightning would otherwise fail deep inside, hang waiting for a node that never comes, or, with
    strategy auto, let every process train the whole model alone as rank 0.
    """

    def number(name: str) -> int | None:
        value = environ.get(name)
        if value is None:
            return None
        if not value.strip().isdigit():
            raise ConfigError(f"{name}={value!r} in the environment: expected a whole number")
        return int(value)

    world_size = devices * trainer.num_nodes
    launched = number("WORLD_SIZE")
    if launched is not None and launched != world_size:
        raise ConfigError(
            f"WORLD_SIZE={launched} in the environment, but trainer.devices x trainer.num_nodes = "
            f"{devices} x {trainer.num_nodes} = {world_size}: set trainer.num_nodes to the number of "
            "nodes and trainer.devices to the processes on each"
        )
    per_node = number("LOCAL_WORLD_SIZE")  # torchrun --nproc-per-node
    if per_node is not None and per_node != devices:
        raise ConfigError(
            f"LOCAL_WORLD_SIZE={per_node} in the environment (torchrun --nproc-per-node), "
            f"but trainer.devices={devices}: they must be equal"
        )
    for name in ("NODE_RANK", "GROUP_RANK"):  # what Lightning reads, in its order
        node_rank = number(name)
        if node_rank is not None:
            if node_rank >= trainer.num_nodes:
                raise ConfigError(
                    f"{name}={node_rank} in the environment, but trainer.num_nodes={trainer.num_nodes}: "
                    f"node ranks run from 0 to {trainer.num_nodes - 1}"
                )
            break


def make_trainer(
    config: Config, devices: int, callbacks: list[Callback], workdir: Path, datamodule: ImageDataModule
) -> L.Trainer:
    """The Trainer of the train stage: early stopping on val_loss, metrics to MLflow, no logger."""
    datamodule.setup("fit")
    steps_per_epoch = len(datamodule.train_dataloader())
    trainer = L.Trainer(
        max_epochs=config.train.max_epochs,
        accelerator=config.trainer.accelerator,
        devices=devices,
        num_nodes=config.trainer.num_nodes,
        strategy=config.trainer.strategy,
        precision=config.trainer.precision,
        deterministic=config.trainer.deterministic,
        logger=False,  # metrics go to MLflow through MlflowEpochMetrics, in batches
        callbacks=[
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
    # deterministic=True also fills each new tensor with NaN, a debugging aid that makes a read of
    # memory no op wrote show up; the fills cost about 15 % of a small CNN's step on a CPU and
    # change no result (no op reads memory it has not written).
    torch.utils.deterministic.fill_uninitialized_memory = False
    return trainer


def fit(trainer: L.Trainer, module: ImageClassifier, datamodule: ImageDataModule) -> float:
    """trainer.fit, in seconds; Ctrl-C and SIGTERM come out as KeyboardInterrupt.

    With DDP, Lightning starts this machine's other processes here (running this stage's command
    again, with LOCAL_RANK set) and waits for every node to join.
    """
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C and SIGTERM into exit(1)
            raise KeyboardInterrupt from None
        raise
    return time.perf_counter() - started


def summarize(
    rows: list[dict[str, float]], seconds: float, tracking_seconds: float, n_train: int, processes: int
) -> dict:
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
        "train_images_per_s": round(len(rows) * n_train / seconds, 1),  # all processes together
        "processes": processes,  # DDP's world size: train.batch_size images each per step
    }
