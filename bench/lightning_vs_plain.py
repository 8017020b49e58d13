"""Training throughput of the Lightning path vs a plain PyTorch loop, same model, data and batches.

Both sides train a copy of one initialised network (imgclf.models.build_model, configured from
conf/ with the workload's overrides) with Adam, no scheduler, for the same epochs over the same
seeded TensorBatches, and both keep what the train stage reports: the summed loss and accuracy
of each epoch. The workload's config also sets the batch size, the precision (bf16 autocast),
the memory format (channels_last) and the label smoothing, which both sides apply alike.
Lightning: imgclf.stages.training.module.ImageClassifier fitted by a CPU Trainer, timed around `trainer.fit`
as the train stage does. Plain: model.train(), zero_grad, forward, backward, step.
Tracked: the Lightning side plus the train stage's MLflow callback on a real sqlite store, with
the default flush interval and with a write every epoch.
Runs alternate (plain, lightning, tracked, ...) after a one-epoch warm-up of each; the best of
--repeats is reported. torch.use_deterministic_algorithms(True) holds for all, as Lightning's
deterministic=True sets it for the whole process (without its NaN fills of new tensors, which the
train stage turns off too: imgclf.stages.training.trainer.make_trainer).

Lightning costs a fixed time per optimizer step (its hooks and loop bookkeeping), so the ratio
depends on how long a step takes: the workloads go from the default digits MLP (about 1 ms a
step) to the mnist_cnn recipe's CNN and batches on MNIST-sized images; `--profile` adds where
Lightning's time per step goes in that recipe (torch.profiler, the hooks' own time).
"""

import argparse
import copy
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from common import ROOT, main_guard, row, write_result
from torch import nn
from torch.nn import functional as F

from imgclf.card import InputSpec, ModelCard, Normalization
from imgclf.config.compose import compose
from imgclf.config.operations import Config, validate
from imgclf.data.datamodule import TensorBatches
from imgclf.data.normalize import ChannelStats
from imgclf.models import build_model
from imgclf.stages.training.callbacks import EpochCurves, MlflowEpochMetrics
from imgclf.stages.training.module import ImageClassifier
from imgclf.tracking import client as tracking

RATIO_TARGET = 0.97
RECIPE_RATIO_TARGET = 0.95  # the mnist_cnn recipe, whose steps are the train stage's real work
TRACKING_SHARE = 0.02  # tracking may cost at most 2% of training time
SEED = 0
LR = 1e-3
BASE_CONFIG = compose([], ROOT / "conf")  # the default config, for the tracking settings


WORKLOADS = {  # name: (data set, config overrides, epochs per timed run, ratio target)
    "digits-mlp": ("digits", [], 40, RATIO_TARGET),  # the train stage's default config, max_epochs too
    "digits-cnn": ("digits", ["model=cnn"], 20, RATIO_TARGET),
    "mnist-recipe": ("synthetic28", ["experiment=mnist_cnn"], 2, RECIPE_RATIO_TARGET),
}


def dataset(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, H, W) in 0..255 and int64 labels."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
        labels = digits.target.astype(np.int64)
    else:  # synthetic28: MNIST-sized random pixels and labels (a step costs what an MNIST step does)
        rng = np.random.default_rng(SEED)
        images = rng.integers(0, 256, size=(12800, 1, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=12800).astype(np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels)


def workload_config(overrides: list[str], epochs: int) -> Config:
    """The workload's config, trained with Adam at LR and no scheduler on both sides."""
    overrides = [*overrides, f"train.max_epochs={epochs}", f"train.lr={LR}", "train.optimizer=adam"]
    overrides += ["train.weight_decay=0.0", "train.scheduler=none"]
    return validate(compose(overrides, ROOT / "conf"))


def network(config: Config, images: torch.Tensor) -> nn.Module:
    stats = ChannelStats()
    stats.update(images.numpy())
    card = ModelCard(
        tuple(str(c) for c in range(10)),
        InputSpec.for_shape(tuple(images.shape[1:]), "stretch"),
        Normalization(**stats.result()),
    )
    torch.manual_seed(SEED)
    return build_model(config.model, card)


def train_plain(net: nn.Module, batches: TensorBatches, config: Config) -> float:
    started = time.perf_counter()
    cfg = config.train
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    bf16 = config.trainer.precision == "bf16-mixed"
    net.train()
    for _ in range(cfg.max_epochs):
        sums = torch.zeros(3)  # loss * n, correct, n: the epoch's train loss and accuracy
        for images, labels in batches:
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = net(images)
            log_probs = F.log_softmax(logits.float(), dim=1)
            loss = F.nll_loss(log_probs, labels)
            smoothing = cfg.label_smoothing  # ImageClassifier's objective; the reported loss stays plain
            objective = loss
            if smoothing:
                objective = (1 - smoothing) * loss - smoothing * log_probs.mean(dim=1).mean()
            objective.backward()
            optimizer.step()
            with torch.no_grad():
                n = labels.new_tensor(len(labels), dtype=torch.float32)
                sums += torch.stack([loss.detach() * n, (logits.argmax(dim=1) == labels).sum().float(), n])
        sums.tolist()
    return time.perf_counter() - started


def lightning_trainer(config: Config, callbacks=(), profiler=None) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=config.train.max_epochs,
        precision=config.trainer.precision,
        logger=False,
        callbacks=[TrainEpochLogged(), *callbacks],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        profiler=profiler,
    )


def train_lightning(net: nn.Module, batches: TensorBatches, config: Config, callbacks=()) -> float:
    """Fit as the train stage does, minus validation (the plain loop has none either)."""
    module = ImageClassifier(net, config.train)
    trainer = lightning_trainer(config, callbacks)
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=batches)
    return time.perf_counter() - started


class TrainEpochLogged(L.Callback):
    """The train stage logs in on_validation_epoch_end; without validation, log at epoch end."""

    def on_train_epoch_end(self, trainer: L.Trainer, module: ImageClassifier) -> None:
        module._log_epoch("train")


def tracked(flush_seconds: float, shares: list[float]):
    """The Lightning side with the train stage's MLflow callback on a real sqlite store.

    Appends to `shares` the fraction of each run's time spent in the callback's store writes:
    the tracking cost itself, measured directly, where the on/off ratio of two separate runs
    carries the machine's run-to-run noise (a few % on 2 shared cores).
    """

    def train(net: nn.Module, batches: TensorBatches, config: Config) -> float:
        from mlflow.tracking import MlflowClient

        store = Path(tempfile.mkdtemp(prefix="imgclf-bench-mlflow-"))
        client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
        run_id = client.create_run(client.create_experiment("bench")).info.run_id
        tracking_section = {**BASE_CONFIG["tracking"], "uri": f"sqlite:///{store}/mlflow.db"}
        store_config = Config.model_validate({**BASE_CONFIG, "tracking": tracking_section})

        spent = []

        def write(points):
            started = time.perf_counter()
            tracking.log_metric_history(store_config, run_id, points)
            spent.append(time.perf_counter() - started)

        curves = EpochCurves()
        callbacks = [curves, MlflowEpochMetrics(curves, write, flush_seconds)]
        seconds = train_lightning(net, batches, config, callbacks)
        shares.append(sum(spent) / seconds)
        return seconds

    return train


def compare(workload: str, repeats: int) -> dict:
    name, overrides, epochs, _ = WORKLOADS[workload]
    images, labels = dataset(name)
    config = workload_config(overrides, epochs)
    warm_up = workload_config(overrides, 1)
    batch_size = config.train.batch_size
    template = network(config, images)
    trainers = {
        "plain": train_plain,
        "lightning": train_lightning,
        "tracked": tracked(BASE_CONFIG["tracking"]["flush_seconds"], shares := []),
        "tracked_every_epoch": tracked(0.0, every_epoch_shares := []),
    }
    seconds: dict[str, list[float]] = {side: [] for side in trainers}
    final: dict[str, nn.Module] = {}
    for attempt in range(repeats + 1):  # attempt 0: one-epoch warm-up, not counted
        for side, train in trainers.items():
            net = copy.deepcopy(template)
            batches = TensorBatches(images, labels, batch_size, shuffle=True, seed=SEED)
            torch.manual_seed(SEED)  # same dropout masks on every side
            elapsed = train(net, batches, warm_up if attempt == 0 else config)
            if attempt:
                seconds[side].append(elapsed)
                final[side] = net
    best = {side: min(times) for side, times in seconds.items()}
    per_s = {side: epochs * len(labels) / t for side, t in best.items()}
    steps = epochs * len(batches)
    plain, lightning = (final[side].state_dict() for side in ("plain", "lightning"))
    max_diff = max(float((plain[k].float() - lightning[k].float()).abs().max()) for k in plain)
    return {
        "images": list(images.shape),
        "batch_size": batch_size,
        "epochs": epochs,
        "steps": steps,
        "plain_ms_per_step": round(1000 * best["plain"] / steps, 3),
        "lightning_overhead_ms_per_step": round(1000 * (best["lightning"] - best["plain"]) / steps, 3),
        "images_per_s": {side: round(v, 1) for side, v in per_s.items()},
        "ratio": round(per_s["lightning"] / per_s["plain"], 4),
        "tracking_ratio": round(per_s["tracked"] / per_s["lightning"], 4),
        # the median timed run ([0] is the one-epoch warm-up); sqlite commits wait on fsync, whose
        # spikes on a shared disk show in the per-run shares kept below
        "tracking_share": round(statistics.median(shares[1:]), 5),
        "tracking_every_epoch_share": round(statistics.median(every_epoch_shares[1:]), 5),
        "tracking_shares": {"default": shares[1:], "every_epoch": every_epoch_shares[1:]},
        "tracking_every_epoch_ratio": round(per_s["tracked_every_epoch"] / per_s["lightning"], 4),
        "seconds": seconds,
        "final_weights_max_abs_diff": max_diff,
    }


def profile_lightning(workload: str, lines: int = 25) -> None:
    """Where a Lightning fit's time goes, by function (cProfile, own time), after a warm-up fit.

    Torch's kernels show as the few `torch` functions that call them (`run_backward`, `conv2d`, ...);
    the rest is Python per step: Lightning's loops and hooks, the optimizer, this project's _step.
    """
    import cProfile
    import pstats

    name, overrides, epochs, _ = WORKLOADS[workload]
    images, labels = dataset(name)
    config = workload_config(overrides, epochs)
    template = network(config, images)
    batches = TensorBatches(images, labels, config.train.batch_size, shuffle=True, seed=SEED)
    train_lightning(copy.deepcopy(template), batches, workload_config(overrides, 1))
    profiler = cProfile.Profile()
    profiler.enable()
    seconds = train_lightning(copy.deepcopy(template), batches, config)
    profiler.disable()
    steps = epochs * len(batches)
    print(f"{workload}: {steps} steps in {seconds:.2f} s, {1000 * seconds / steps:.2f} ms a step")
    stats = pstats.Stats(profiler)
    by_origin: dict[str, float] = {}
    for (filename, _, function), (_, _, own, _, _) in stats.stats.items():
        if "/lightning/" in filename:
            origin = "Lightning (loops, hooks, results, precision plugin)"
        elif "/torch/optim/" in filename:
            origin = "torch.optim (Adam's Python)"
        elif "/torch/" in filename:
            origin = "torch Python (nn.Module calls, autograd glue)"
        elif "/imgclf/" in filename:
            origin = "imgclf (ImageClassifier._step, Normalize, batches)"
        elif filename == "~" and function.startswith("<method 'run_backward'"):
            origin = "torch kernels: backward"
        elif filename == "~" and "torch" in function:
            origin = "torch kernels: forward and optimizer"
        else:
            origin = "other (Python built-ins)"
        by_origin[origin] = by_origin.get(origin, 0.0) + own
    total = sum(by_origin.values())
    for origin, own in sorted(by_origin.items(), key=lambda item: -item[1]):
        print(f"{own / total:7.1%}  {1000 * own / steps:6.3f} ms/step  {origin}")
    stats.sort_stats("tottime").print_stats(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (best kept)")
    parser.add_argument("--profile", choices=WORKLOADS, help="only profile the Lightning side of a workload")
    args = parser.parse_args()

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    import mlflow  # noqa: F401 (configures its loggers on import: quiet them after that)

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # as the train stage (make_trainer)
    if args.profile:
        profile_lightning(args.profile)
        return
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    print(
        f"best of {args.repeats}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    rows, details = [], {"args": vars(args), "torch_threads": torch.get_num_threads()}
    for workload in workloads:
        result = compare(workload, args.repeats)
        details[workload] = result
        per_s = result["images_per_s"]
        rows += [
            row(f"{workload} step, plain", result["plain_ms_per_step"], "ms"),
            row(f"{workload} Lightning cost per step", result["lightning_overhead_ms_per_step"], "ms"),
            row(f"{workload} plain", per_s["plain"], "img/s"),
            row(f"{workload} lightning", per_s["lightning"], "img/s"),
            row(f"{workload} lightning/plain", result["ratio"], "", ">=", WORKLOADS[workload][3]),
            row(f"{workload} MLflow share of fit", result["tracking_share"], "", "<=", TRACKING_SHARE),
            row(f"{workload} MLflow on/off (noisy)", result["tracking_ratio"], ""),
            row(f"{workload} MLflow every epoch, share of fit", result["tracking_every_epoch_share"], ""),
            row(f"{workload} MLflow every epoch on/off (noisy)", result["tracking_every_epoch_ratio"], ""),
        ]
    write_result("lightning_vs_plain", rows, details)


if __name__ == "__main__":
    main_guard(main)
