"""The train stage: fit the configured model; write the best checkpoint, metrics and curves."""

import io
import os
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from imgclf.config.pipeline import PipelineConfig
from imgclf.data.datamodule import ImageDataModule
from imgclf.data.normalized import REPORT, load_card
from imgclf.fileio import atomic_path, write_json
from imgclf.models import build_model, checkpoint_record
from imgclf.stages.training.callbacks import EpochCurves, MlflowEpochMetrics, epoch_log_path, write_curves
from imgclf.stages.training.launch import check_launch, processes_per_node
from imgclf.stages.training.module import ImageClassifier
from imgclf.stages.training.trainer import fit, make_trainer, quiet_lightning
from imgclf.tracking import client as tracking
from imgclf.tracking.local import file_sha256, write_record
from imgclf.tracking.plots import draw_curves
from imgclf.tracking.worker import Tracker

# metrics/train.json's keys as MLflow metrics: the best epoch's numbers say so; the rest as they are
BEST = {key: f"best_{key}" for key in ("train_loss", "train_acc", "val_loss", "val_acc")}


@dataclass(frozen=True)
class TrainPaths:
    """What the train stage reads and writes: its `cmd:` in dvc.yaml names each."""

    params: Path
    data: Path  # data/normalized
    raw: Path  # data/raw/<name>: hashed into the run's lineage
    checkpoint: Path
    metrics: Path  # metrics/train.json: the numbers the same run always gives (git-tracked)
    curves: Path
    curves_png: Path | None = None
    run_record: Path | None = None  # models/run.json: the MLflow run of this checkout's model (git-ignored)
    local_metrics: Path | None = None  # metrics/local/train.json: this machine's timings (git-ignored)


def train(config: PipelineConfig, paths: TrainPaths, tracker: Tracker) -> dict[str, float]:
    """Train the configured model on data/normalized/; write the best checkpoint, metrics, curves.

    Under DDP every process runs this; global rank 0 alone opens the MLflow run (through
    `tracker`), hashes the data and writes the outputs. Returns the metrics; {} in every other
    process, which writes nothing.
    """
    quiet_lightning()
    devices = processes_per_node(config.trainer)
    check_launch(config.trainer, devices, os.environ)  # before any work: a wrong launch trains nothing
    L.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = ImageDataModule(
        paths.data, config.train.batch_size, config.seed, augment=config.train.augment
    )
    card = load_card(paths.data)
    net = build_model(config.model, card)
    curves = EpochCurves(epoch_log_path(os.environ))  # rank 0 writes it; set by imgclf sweep
    to_mlflow = MlflowEpochMetrics(
        curves, partial(tracker.log, tracking.log_metric_history), config.tracking.flush_seconds
    )
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
        run_id = tracker.follow(
            tracking.open_run, tracker.params, paths.data, paths.raw, paths.data / REPORT
        ).result()
        # FINISHED when training is done; export continues the run, evaluate adds to it.
        with tracker.run_status():
            module = ImageClassifier(net, config.train, checkpoint_record(card, config.model))
            seconds = fit(trainer, module, datamodule)
            save_checkpoint(Path(best.best_model_path), paths.checkpoint)
            n_train = len(datamodule.splits["train"][1])
            metrics = summarize(curves.rows, trainer.world_size)
            timings = time_fit(curves.rows, seconds, to_mlflow.seconds, n_train)
            write_json(paths.metrics, metrics)
            write_curves(curves.rows, paths.curves)
            if paths.run_record:
                ckpt = {"checkpoint_sha256": file_sha256(paths.checkpoint)}
                write_record(paths.run_record, {"mlflow_run_id": run_id, **ckpt})
                if paths.local_metrics:
                    write_record(paths.local_metrics, {**timings, **ckpt})
            tracker.log(tracking.log_metrics, {BEST.get(k, k): v for k, v in (metrics | timings).items()})
            tracker.log(tracking.log_artifacts, [paths.params, paths.metrics, paths.curves])
            if paths.curves_png:
                tracker.submit(draw_curves, curves.rows, paths.curves_png)
                tracker.log(tracking.log_artifacts, [paths.curves_png], "plots")
    return metrics


def summarize(rows: list[dict[str, float]], processes: int) -> dict:
    """metrics/train.json: the best epoch's numbers (lowest val_loss); what the same code, data and
    config always give, so that a clean clone's `make run` rewrites it byte for byte."""
    best = min(rows, key=lambda row: row.get("val_loss", float("inf")))
    return {
        "train_loss": best["train_loss"],
        "train_acc": best["train_acc"],
        "val_loss": best["val_loss"],
        "val_acc": best["val_acc"],
        "best_epoch": best["epoch"],
        "epochs": len(rows),
        "processes": processes,  # DDP's world size: train.batch_size images each per step
    }


def time_fit(rows: list[dict[str, float]], seconds: float, tracking_seconds: float, n_train: int) -> dict:
    """What the fit cost on this machine (metrics/local/train.json and MLflow, never git)."""
    return {
        "train_seconds": round(seconds, 3),
        "tracking_seconds": round(tracking_seconds, 3),
        "train_images_per_s": round(len(rows) * n_train / seconds, 1),  # all processes together
    }


def save_checkpoint(best: Path, target: Path) -> None:
    """The best epoch's checkpoint, without what differs between identical trainings: the
    callbacks' state names the temporary folder the Trainer wrote in."""
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    checkpoint.pop("callbacks", None)
    # Into memory first: torch.save names the archive's folder after the file it writes, and the
    # file here would be a temporary one with a random name.
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with atomic_path(target) as tmp:
        tmp.write_bytes(buffer.getvalue())
