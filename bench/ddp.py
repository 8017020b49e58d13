"""Two DDP "nodes" on 127.0.0.1 against one process with the same global batch, on CPU (gloo).

Loop workloads: each side is a separate process (`--worker`) that fits imgclf's ImageClassifier on
its ImageDataModule with a Lightning Trainer set as the train stage sets it (deterministic, no
logger), training epochs only (no validation, which every DDP process runs in full). Two nodes:
two processes with NODE_RANK 0 and 1, trainer num_nodes=2, devices=1, 64 images each per step;
one process: 128 a step. Dropout and augmentation are off, so on digits the two must end with
the same weights (checked, 1e-6; the other workloads: see WORKLOADS). Timed: every optimizer
step after the first epoch (which holds process-group set-up and the wait for the other node),
pooled over --repeats runs; the figure is the 10th percentile, a step that no other process on
the 2 shared cores interrupted (medians are kept in the details).

The nodes get one thread each (OMP_NUM_THREADS=1), as two one-core machines would have. One
process is timed with 1 thread (one node's cores: two nodes / one process is what a second such
machine buys, less a real network's latency, here loopback) and with 2 (the whole machine).

Communication share: the same two-node run with a DDP communication hook that sends nothing
(each process keeps its own gradients), so 1 - t_no_comm / t_ddp is the time gloo's all-reduce
adds to a step, its overlap with the backward pass taken into account. Also reported: the
all-reduce time in flight (bucket ready -> averaged gradient back, summed over a step's buckets)
as a share of the step, measured by a hook that wraps the default all-reduce; it overlaps the
backward pass, so it is an upper bound.

Stage workload: the real train stage (`python pipelines/train.py`, default config, digits) as one
process with train.batch_size=128 (with torch's default threads, as `dvc repro` runs it, and with
one) and as two nodes with 64 each: wall time of the whole command (start-up, rendezvous,
validation, MLflow included) and the stage's own train_seconds; best of --repeats.

Data: digits (1,797 8x8 images; the train split cut to an even 1,256 so that both sides see the
same images) is small enough that a step is about a millisecond; mnist28 is MNIST-sized
synthetic data (12,000 random 28x28 images, 10 classes) for steps that cost more than the
all-reduce of their gradients.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, BenchError, main_guard, pipeline_metrics, row, write_result

from tests.support.repo import VENV_BIN
from tests.support.servers import free_port

WORKLOADS = {  # name: (data, model, epochs per timed run, other overrides)
    "digits-mlp": ("digits", "mlp", 12, []),  # the default MLP (256, 128), about 1 ms a step
    # 235k parameters: 0.9 MB of gradients a step. Random labels make training chaotic: two
    # summation orders drift apart (float noise, 1.5e-8 after one epoch, 1e-5 after three), so
    # its weights are reported, not checked. SGD: Adam turns gradients that are mere rounding
    # noise into lr-sized steps (0.07 apart after three epochs).
    "mnist28-mlp": ("mnist28", "mlp", 3, ["train.optimizer=sgd"]),
    # 468k parameters (1.9 MB of gradients), far more compute per image. Batch norm: each process
    # normalises over its own 64 images, so the weights differ from one process's by design.
    "mnist28-cnn": ("mnist28", "cnn", 2, []),
}
BATCH_NORM = {"cnn"}
GLOBAL_BATCH = 128
SEED = 0


# --- data -------------------------------------------------------------------------------------


def digits_folders(root: Path) -> tuple[Path, Path]:
    """data/raw/digits and data/normalized as the pipeline makes them (default config)."""
    from imgclf.config.compose import compose
    from imgclf.config.operations import validate
    from imgclf.data.download import download
    from imgclf.data.normalize import normalize

    config = validate(compose([], ROOT / "conf"))
    raw = download(config.data, root / "raw" / "digits")
    normalize(config.data, config.seed, raw, root / "normalized")
    return raw, root / "normalized"


def even_copy(normalized: Path, target: Path) -> Path:
    """`normalized` with an even number of training images: two processes split it exactly."""
    shutil.copytree(normalized, target)
    images = np.load(target / "train" / "images.npy")
    labels = np.load(target / "train" / "labels.npy")
    n = len(labels) // 2 * 2
    np.save(target / "train" / "images.npy", images[:n])
    np.save(target / "train" / "labels.npy", labels[:n])
    return target


def synthetic_mnist(target: Path, n_train: int = 12000, n_val: int = 2000) -> Path:
    """A normalized folder of MNIST-sized random images and labels."""
    from imgclf.card import InputSpec, ModelCard, Normalization
    from imgclf.fileio import write_json

    rng = np.random.default_rng(SEED)
    for split, n in (("train", n_train), ("val", n_val)):
        (target / split).mkdir(parents=True)
        np.save(target / split / "images.npy", rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8))
        np.save(target / split / "labels.npy", rng.integers(0, 10, n).astype(np.int64))
    card = ModelCard(
        tuple(str(c) for c in range(10)),
        InputSpec.for_shape((1, 28, 28), "stretch"),
        Normalization([127.5], [73.9]),
    )
    write_json(target / "card.json", card.to_json())
    return target


# --- one side of a loop workload, in a process of its own -------------------------------------


def worker(args: argparse.Namespace) -> None:
    """Fit as the train stage does, minus validation; rank 0 writes the timings and weights."""
    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from imgclf.config.compose import compose
    from imgclf.config.operations import validate
    from imgclf.data.datamodule import ImageDataModule
    from imgclf.data.normalized import load_card
    from imgclf.models import build_model
    from imgclf.stages.training.module import ImageClassifier
    from imgclf.stages.training.trainer import quiet_lightning

    quiet_lightning()
    torch.set_num_threads(args.threads)
    _, model, epochs, extra = WORKLOADS[args.workload]
    batch = GLOBAL_BATCH // args.nodes
    overrides = [f"model={model}", "model.dropout=0.0", "train.augment.invert=false"]
    overrides += [f"train.batch_size={batch}", f"train.max_epochs={epochs}", *extra]
    config = validate(compose(overrides, ROOT / "conf"))
    L.seed_everything(SEED, workers=True, verbose=False)
    data = Path(args.data)
    datamodule = ImageDataModule(data, batch, SEED, augment=config.train.augment)
    module = ImageClassifier(build_model(config.model, load_card(data)), config.train)
    in_flight: list[float] = []

    def timed_allreduce(state, bucket):
        started = time.perf_counter()

        def done(future):
            in_flight.append(time.perf_counter() - started)
            return future.value()

        return default_hooks.allreduce_hook(None, bucket).then(done)

    def no_comm(state, bucket):
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    class Timings(L.Callback):
        """Each optimizer step's seconds (forward, backward with its all-reduce, optimizer step)
        and the all-reduce time in flight within it, from the second epoch on."""

        def __init__(self):
            self.steps: list[float] = []
            self.in_flight: list[float] = []

        def on_train_start(self, trainer, module):
            # Lightning registers communication hooks on CUDA only: register it here, on CPU too.
            if args.nodes > 1:
                hook = {"allreduce": timed_allreduce, "none": no_comm}[args.comm]
                trainer.strategy.model.register_comm_hook(None, hook)

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            in_flight.clear()
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.current_epoch > 0:  # the first holds set-up and the wait for the other node
                self.steps.append(time.perf_counter() - self.started)
                self.in_flight.append(sum(in_flight))

    timings = Timings()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=args.nodes,
        strategy=DDPStrategy() if args.nodes > 1 else "auto",
        max_epochs=epochs,
        deterministic=True,
        logger=False,
        callbacks=[timings],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    if trainer.is_global_zero:
        torch.save(module.net.state_dict(), f"{args.out}.pt")
        result = {
            "fit_seconds": time.perf_counter() - started,
            "step_seconds": timings.steps,
            "allreduce_in_flight_seconds": timings.in_flight,
            "global_step": trainer.global_step,
        }
        Path(args.out).write_text(json.dumps(result))


def run_side(workload: str, data: Path, out: Path, nodes: int, threads: int, comm: str = "allreduce") -> dict:
    """One process, or `nodes` processes on 127.0.0.1 with NODE_RANK 0..nodes-1; rank 0's result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--workload", workload]
    cmd += ["--data", str(data), "--out", str(out), "--nodes", str(nodes), "--threads", str(threads)]
    cmd += ["--comm", comm]
    port = str(free_port())
    launch = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(nodes)}
    processes = [
        subprocess.Popen(
            cmd,
            env=env | (launch | {"NODE_RANK": str(rank)} if nodes > 1 else {}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(nodes)
    ]
    logs = [process.communicate(timeout=900)[0] for process in processes]
    for process, log in zip(processes, logs, strict=True):
        if process.returncode:
            raise BenchError(f"{workload} worker exited {process.returncode}:\n{log[-3000:]}")
    return json.loads(out.read_text())


def quantile(values: list[float], q: float) -> float:
    return float(np.quantile(values, q))


def compare_loop(workload: str, data: Path, scratch: Path, repeats: int) -> dict:
    """Step times pooled over the repeats. The 10th percentile is the figure: on 2 cores shared
    with other work, a step that no other process interrupted (in either node) is the cost of
    the step itself; the medians are kept beside it."""
    import torch

    sides = {  # name: (nodes, threads per process, communication)
        "one_process_1_thread": (1, 1, "allreduce"),
        "one_process_2_threads": (1, 2, "allreduce"),
        "two_nodes": (2, 1, "allreduce"),
        "two_nodes_no_comm": (2, 1, "none"),
    }
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for attempt in range(repeats):
        for side, (nodes, threads, comm) in sides.items():
            out = scratch / f"{workload}-{side}-{attempt}.json"
            result = run_side(workload, data, out, nodes, threads, comm)
            results[side].append(result)
            p10 = 1000 * quantile(result["step_seconds"], 0.1)
            print(f"  {workload} {side} #{attempt + 1}: step p10 {p10:.3f} ms", flush=True)
    steps = {side: [s for r in runs for s in r["step_seconds"]] for side, runs in results.items()}
    p10 = {side: quantile(values, 0.1) for side, values in steps.items()}
    median = {side: quantile(values, 0.5) for side, values in steps.items()}
    ddp = results["two_nodes"]
    shares = [
        f / s for r in ddp for f, s in zip(r["allreduce_in_flight_seconds"], r["step_seconds"], strict=True)
    ]
    one = torch.load(scratch / f"{workload}-one_process_1_thread-0.json.pt", weights_only=True)
    two = torch.load(scratch / f"{workload}-two_nodes-0.json.pt", weights_only=True)
    return {
        "steps_timed_per_run": len(ddp[0]["step_seconds"]),
        "global_steps": {side: runs[0]["global_step"] for side, runs in results.items()},
        "step_ms_p10": {side: round(1000 * v, 3) for side, v in p10.items()},
        "step_ms_median": {side: round(1000 * v, 3) for side, v in median.items()},
        "fit_seconds": {side: [round(r["fit_seconds"], 2) for r in runs] for side, runs in results.items()},
        "ratio_two_nodes_vs_one_process_1_thread": round(p10["two_nodes"] / p10["one_process_1_thread"], 3),
        "ratio_two_nodes_vs_one_process_2_threads": round(p10["two_nodes"] / p10["one_process_2_threads"], 3),
        "ratio_median_two_nodes_vs_one_process_1_thread": round(
            median["two_nodes"] / median["one_process_1_thread"], 3
        ),
        "comm_share_no_comm_hook": round(1 - p10["two_nodes_no_comm"] / p10["two_nodes"], 3),
        "comm_share_no_comm_hook_median": round(1 - median["two_nodes_no_comm"] / median["two_nodes"], 3),
        "allreduce_in_flight_share_median": round(quantile(shares, 0.5), 3),
        "final_weights_max_abs_diff": max(float((one[k] - two[k]).abs().max()) for k in one),
    }


# --- the real train stage ---------------------------------------------------------------------


def compare_stage(raw: Path, normalized: Path, scratch: Path, repeats: int) -> dict:
    """`python pipelines/train.py` (dvc.yaml's command), default config: one process with batch
    128 against two nodes with 64; each node in a folder of its own, one MLflow store each side."""
    from imgclf.config.compose import write_params

    # one process as `dvc repro` runs it (torch's default threads: 2 here), and with one thread
    sides = {
        "one_process": (1, ["train.batch_size=128"]),
        "one_process_1_thread": (1, ["train.batch_size=128"]),
    }
    sides["two_nodes"] = (
        2,
        ["trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2", "train.batch_size=64"],
    )
    wall: dict[str, list[float]] = {side: [] for side in sides}
    train_seconds: dict[str, list[float]] = {side: [] for side in sides}
    epochs: dict[str, int] = {}
    for attempt in range(repeats):
        for side, (nodes, overrides) in sides.items():
            folder = scratch / f"stage-{side}-{attempt}"
            folder.mkdir()
            write_params(overrides, ROOT / "conf", folder / "params.yaml")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
            env |= {"PYTHONPATH": str(ROOT / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"}
            env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
            if nodes > 1:
                env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
            if nodes > 1 or side.endswith("1_thread"):
                env["OMP_NUM_THREADS"] = "1"
            started = time.perf_counter()
            processes = []
            for rank in range(nodes):
                node = folder / f"node{rank}"
                node.mkdir()
                cmd = [
                    sys.executable,
                    str(ROOT / "pipelines/train.py"),
                    "--params",
                    str(folder / "params.yaml"),
                ]
                cmd += ["--data", str(normalized), "--raw", str(raw), "--checkpoint", "models/model.ckpt"]
                cmd += ["--metrics", "metrics/train.json", "--curves", "plots/train_curves.csv"]
                cmd += ["--curves-png", "plots/train_curves.png"]
                cmd += ["--run-record", "models/run.json", "--local-metrics", "metrics/local/train.json"]
                rank_env = env | ({"NODE_RANK": str(rank)} if nodes > 1 else {})
                processes.append(
                    subprocess.Popen(
                        cmd,
                        cwd=node,
                        env=rank_env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
            logs = [process.communicate(timeout=900)[0] for process in processes]
            wall[side].append(time.perf_counter() - started)
            for process, log in zip(processes, logs, strict=True):
                if process.returncode:
                    raise BenchError(f"stage {side} exited {process.returncode}:\n{log[-3000:]}")
            metrics = pipeline_metrics(folder / "node0", "train")
            train_seconds[side].append(metrics["train_seconds"])
            epochs[side] = metrics["epochs"]
            print(f"  stage {side} #{attempt + 1}: {wall[side][-1]:.1f} s wall", flush=True)
    best_wall = {side: min(times) for side, times in wall.items()}
    best_train = {side: min(times) for side, times in train_seconds.items()}
    return {
        "wall_seconds": wall,
        "train_seconds": train_seconds,
        "epochs": epochs,
        "best_wall_seconds": best_wall,
        "best_train_seconds": best_train,
        "ratio_wall": {
            side: round(best_wall["two_nodes"] / best_wall[side], 3) for side in sides if side != "two_nodes"
        },
        "ratio_train_seconds": {
            side: round(best_train["two_nodes"] / best_train[side], 3)
            for side in sides
            if side != "two_nodes"
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "stage", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side (steps pooled; stage: best)")
    for hidden in ("--data", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--comm", choices=["allreduce", "none"], default="allreduce", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    workloads = [*WORKLOADS, "stage"] if args.workload == "all" else [args.workload]
    # 2 shared cores: other processes' load shows in every timing; recorded beside them
    rows, details = [], {"args": vars(args) | {"global_batch": GLOBAL_BATCH}, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-ddp-") as tmp:
        scratch = Path(tmp)
        raw, normalized = digits_folders(scratch / "digits")
        data = {
            "digits": even_copy(normalized, scratch / "digits-even"),
            "mnist28": synthetic_mnist(scratch / "mnist28"),
        }
        for workload in workloads:
            if workload == "stage":
                result = compare_stage(raw, normalized, scratch, args.repeats)
                details["stage"] = result
                for side, name in (("one_process", "default threads"), ("one_process_1_thread", "1 thread")):
                    rows += [
                        row(
                            f"stage: one process ({name}), wall",
                            round(result["best_wall_seconds"][side], 1),
                            "s",
                        ),
                        row(
                            f"stage: one process ({name}), train_seconds",
                            result["best_train_seconds"][side],
                            "s",
                        ),
                    ]
                rows += [
                    row("stage: two nodes, wall", round(result["best_wall_seconds"]["two_nodes"], 1), "s"),
                    row("stage: two nodes, train_seconds", result["best_train_seconds"]["two_nodes"], "s"),
                ]
                continue
            result = compare_loop(workload, data[WORKLOADS[workload][0]], scratch, args.repeats)
            details[workload] = result
            ms = result["step_ms_p10"]
            rows += [
                row(f"{workload} step p10, one process 1 thread", ms["one_process_1_thread"], "ms"),
                row(f"{workload} step p10, one process 2 threads", ms["one_process_2_threads"], "ms"),
                row(f"{workload} step p10, two nodes", ms["two_nodes"], "ms"),
                row(f"{workload} step p10, two nodes, no communication", ms["two_nodes_no_comm"], "ms"),
                row(
                    f"{workload} two nodes / one process 1 thread",
                    result["ratio_two_nodes_vs_one_process_1_thread"],
                ),
                row(
                    f"{workload} two nodes / one process 2 threads",
                    result["ratio_two_nodes_vs_one_process_2_threads"],
                ),
                row(f"{workload} gloo share of a step (no-comm hook)", result["comm_share_no_comm_hook"]),
                row(
                    f"{workload} all-reduce in flight / step (median)",
                    result["allreduce_in_flight_share_median"],
                ),
            ]
            name, model, _, _ = WORKLOADS[workload]
            if model not in BATCH_NORM:
                check = ("<=", 1e-6) if name == "digits" else (None, None)  # random labels: see WORKLOADS
                diff = result["final_weights_max_abs_diff"]
                rows.append(row(f"{workload} weights, max |two nodes - one process|", diff, "", *check))
    details["load_after"] = os.getloadavg()
    write_result("ddp", rows, details)


if __name__ == "__main__":
    main_guard(main)
