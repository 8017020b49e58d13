"""Training throughput of the Lightning path vs a plain PyTorch loop, same model, data and batches.

Both sides train a copy of one initialised network (imgclf.models.build_model, configured from
conf/model/<m>.yaml) with Adam, no scheduler, for the same epochs over the same seeded
TensorBatches. Lightning: imgclf.training.ImageClassifier fitted by a bare CPU Trainer, timed
around `trainer.fit` as the train stage does. Plain: model.train(), zero_grad, backward, step.
Runs alternate (plain, lightning, plain, ...) after a one-epoch warm-up of each; the best of
--repeats is reported. torch.use_deterministic_algorithms(True) holds for both, as Lightning's
deterministic=True sets it for the whole process.
"""

import argparse
import copy
import logging
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from common import ROOT, main_guard, row, write_result
from torch import nn
from torch.nn import functional as F

from imgclf.config import CNNConfig, MLPConfig, TrainConfig
from imgclf.data.datamodule import TensorBatches
from imgclf.data.normalize import channel_stats
from imgclf.models import build_model
from imgclf.training import ImageClassifier

RATIO_TARGET = 0.97
TRACKING_TARGET = 0.98  # tracking may cost at most 2% of training throughput
SEED = 0
LR = 1e-3


def dataset(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, H, W) in 0..255 and int64 labels."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
        labels = digits.target.astype(np.int64)
    else:  # synthetic28: MNIST-sized random pixels and labels
        rng = np.random.default_rng(SEED)
        images = rng.integers(0, 256, size=(6000, 1, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=6000).astype(np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels)


def network(model: str, images: torch.Tensor) -> nn.Module:
    raw = yaml.safe_load((ROOT / "conf" / "model" / f"{model}.yaml").read_text(encoding="utf-8"))
    config = (MLPConfig if model == "mlp" else CNNConfig).model_validate(raw)
    torch.manual_seed(SEED)
    return build_model(config, tuple(images.shape[1:]), 10, channel_stats(images.numpy()))


def train_plain(net: nn.Module, batches: TensorBatches, epochs: int) -> float:
    started = time.perf_counter()
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    net.train()
    for _ in range(epochs):
        for images, labels in batches:
            optimizer.zero_grad()
            loss = F.cross_entropy(net(images), labels)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def train_lightning(net: nn.Module, batches: TensorBatches, epochs: int, logger=False) -> float:
    config = TrainConfig(
        max_epochs=epochs, batch_size=batches.batch_size, lr=LR, weight_decay=0.0, scheduler="none"
    )
    module = ImageClassifier(net, config)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=batches)
    return time.perf_counter() - started


def train_tracked(net: nn.Module, batches: TensorBatches, epochs: int) -> float:
    """The Lightning side with the train stage's MLflow logger on a real sqlite store."""
    from lightning.pytorch.loggers import MLFlowLogger

    store = Path(tempfile.mkdtemp(prefix="imgclf-bench-mlflow-"))
    logger = MLFlowLogger(
        experiment_name="bench", tracking_uri=f"sqlite:///{store}/mlflow.db", synchronous=False
    )
    _ = logger.experiment  # create the store and the run before the clock starts
    return train_lightning(net, batches, epochs, logger=logger)


def compare(model: str, data, epochs: int, batch_size: int, repeats: int) -> dict:
    images, labels = data
    template = network(model, images)
    trainers = {"plain": train_plain, "lightning": train_lightning, "tracked": train_tracked}
    seconds: dict[str, list[float]] = {side: [] for side in trainers}
    final: dict[str, nn.Module] = {}
    for attempt in range(repeats + 1):  # attempt 0: one-epoch warm-up, not counted
        for side, train in trainers.items():
            net = copy.deepcopy(template)
            batches = TensorBatches(images, labels, batch_size, shuffle=True, seed=SEED)
            torch.manual_seed(SEED)  # same dropout masks on both sides
            elapsed = train(net, batches, 1 if attempt == 0 else epochs)
            if attempt:
                seconds[side].append(elapsed)
                final[side] = net
    per_s = {side: epochs * len(labels) / min(times) for side, times in seconds.items()}
    plain, lightning = (final[side].state_dict() for side in ("plain", "lightning"))
    max_diff = max(float((plain[k].float() - lightning[k].float()).abs().max()) for k in plain)
    return {
        "plain_images_per_s": round(per_s["plain"], 1),
        "lightning_images_per_s": round(per_s["lightning"], 1),
        "ratio": round(per_s["lightning"] / per_s["plain"], 4),
        "tracked_images_per_s": round(per_s["tracked"], 1),
        "tracking_ratio": round(per_s["tracked"] / per_s["lightning"], 4),
        "seconds": seconds,
        "final_weights_max_abs_diff": max_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "cnn", "both"], default="both")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (best kept)")
    parser.add_argument("--dataset", choices=["digits", "synthetic28"], default="digits")
    args = parser.parse_args()

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    torch.use_deterministic_algorithms(True)
    data = dataset(args.dataset)
    models = ["mlp", "cnn"] if args.model == "both" else [args.model]
    print(
        f"{args.dataset}: {tuple(data[0].shape)}, {args.epochs} epochs, batch {args.batch_size}, "
        f"best of {args.repeats}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    rows, details = [], {"args": vars(args), "torch_threads": torch.get_num_threads()}
    for model in models:
        result = compare(model, data, args.epochs, args.batch_size, args.repeats)
        details[model] = result
        tag = f"{model} {args.dataset}"
        rows += [
            row(f"{tag} plain", result["plain_images_per_s"], "img/s"),
            row(f"{tag} lightning", result["lightning_images_per_s"], "img/s"),
            row(f"{tag} lightning/plain", result["ratio"], "", ">=", RATIO_TARGET),
            row(f"{tag} with MLflow/without", result["tracking_ratio"], "", ">=", TRACKING_TARGET),
        ]
    write_result("lightning_vs_plain", rows, details)


if __name__ == "__main__":
    main_guard(main)
