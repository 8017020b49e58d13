"""The Lightning Trainer of the train stage, and the fit."""

import logging
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping

from imgclf.config.pipeline import PipelineConfig
from imgclf.data.datamodule import ImageDataModule
from imgclf.stages.training.callbacks import ModelLine, progress_callback
from imgclf.stages.training.module import ImageClassifier


def quiet_lightning() -> None:
    """Lightning's banner lines (accelerator availability, tips) are noise in a pipeline log."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch internals, not actionable


def make_trainer(
    config: PipelineConfig,
    devices: int,
    callbacks: list[Callback],
    workdir: Path,
    datamodule: ImageDataModule,
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
