"""Inference speed of the exported ONNX model in ONNX Runtime vs the same network in PyTorch.

ONNX Runtime: imgclf.stages.evaluation.inference_session (CPU, intra-op threads 0 = ORT's default).
PyTorch: imgclf.stages.export.Probabilities around the network of imgclf.models.load_checkpoint, eager,
in torch.inference_mode(), at torch's default thread count. Both take uint8 numpy images and
return numpy probabilities. Batch-1 latency: median over --latency-runs after a warm-up;
batch throughput: full batches for at least --seconds. Engines alternate, best of --rounds.

The models: for each of --models, `imgclf params model=<m>` and `dvc repro` in a committed
temporary copy of the work tree (digits); or one given --checkpoint and --onnx.
"""

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import BenchError, main_guard, row, write_result

from tests.support.repo import pipeline_env, repo_copy, run

LATENCY_RATIO_TARGET = 0.5  # ORT / torch, at most
THROUGHPUT_RATIO_TARGET = 2.0  # ORT / torch, at least
WARMUP = 50


def latency_ms(predict: Callable, images: np.ndarray, runs: int) -> float:
    singles = [np.ascontiguousarray(images[i % len(images)][None]) for i in range(runs)]
    for single in singles[:WARMUP]:
        predict(single)
    timings = []
    for single in singles:
        started = time.perf_counter()
        predict(single)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000


def throughput(predict: Callable, batch: np.ndarray, seconds: float) -> float:
    predict(batch)
    runs, started = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < seconds:
        predict(batch)
        runs += 1
    return runs * len(batch) / (time.perf_counter() - started)


def engines(checkpoint: Path, onnx_path: Path) -> tuple[dict[str, Callable], dict]:
    import torch

    from imgclf.models import load_checkpoint
    from imgclf.runtime import inference_session
    from imgclf.stages.export import Probabilities

    trained = load_checkpoint(checkpoint)
    model = Probabilities(trained.net).eval()
    session = inference_session(onnx_path)
    input_name = session.get_inputs()[0].name

    def run_torch(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images)).numpy()

    def run_ort(images: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: images})[0]

    threads = {
        "torch_threads": torch.get_num_threads(),
        "ort_intra_op_threads": session.get_session_options().intra_op_num_threads,
    }
    return {"onnxruntime": run_ort, "torch": run_torch}, {"trained": trained, **threads}


def measure(checkpoint: Path, onnx_path: Path, args: argparse.Namespace) -> tuple[list[dict], dict]:
    predictors, info = engines(checkpoint, onnx_path)
    trained = info.pop("trained")
    model, input_shape = trained.model.name, list(trained.card.input.shape)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.batch, *input_shape), dtype=np.uint8)
    outputs = {name: predict(images) for name, predict in predictors.items()}
    max_diff = float(np.abs(outputs["onnxruntime"] - outputs["torch"]).max())
    print(
        f"input {input_shape} uint8, model {model}; "
        f"torch threads {info['torch_threads']} (torch default), "
        f"ORT intra-op threads {info['ort_intra_op_threads']} (0 = ORT default); "
        f"max |dp| ORT vs torch {max_diff:.1e}",
        flush=True,
    )
    latency = {name: [] for name in predictors}
    per_s = {name: [] for name in predictors}
    for _ in range(args.rounds):
        for name, predict in predictors.items():
            latency[name].append(latency_ms(predict, images, args.latency_runs))
            per_s[name].append(throughput(predict, images, args.seconds))
    best_ms = {name: min(values) for name, values in latency.items()}
    best_per_s = {name: max(values) for name, values in per_s.items()}
    b = args.batch
    rows = [
        row(f"{model} ORT batch-1 latency p50", round(best_ms["onnxruntime"], 4), "ms"),
        row(f"{model} torch batch-1 latency p50", round(best_ms["torch"], 4), "ms"),
        row(
            f"{model} ORT/torch latency",
            round(best_ms["onnxruntime"] / best_ms["torch"], 3),
            "",
            "<=",
            LATENCY_RATIO_TARGET,
        ),
        row(f"{model} ORT batch-{b} throughput", round(best_per_s["onnxruntime"], 1), "img/s"),
        row(f"{model} torch batch-{b} throughput", round(best_per_s["torch"], 1), "img/s"),
        row(
            f"{model} ORT/torch throughput",
            round(best_per_s["onnxruntime"] / best_per_s["torch"], 3),
            "",
            ">=",
            THROUGHPUT_RATIO_TARGET,
        ),
    ]
    details = {
        "model": trained.model.model_dump(),
        "input_shape": input_shape,
        **info,
        "max_abs_diff_probabilities": max_diff,
        "latency_ms_per_round": latency,
        "images_per_s_per_round": per_s,
    }
    return rows, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--checkpoint", type=Path, help="measure this model instead (with --onnx)")
    parser.add_argument("--onnx", type=Path)
    parser.add_argument("--latency-runs", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=1.0, help="min time per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (best kept)")
    args = parser.parse_args()
    rows, details = [], {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.checkpoint or args.onnx:
        missing = [str(p) for p in (args.checkpoint, args.onnx) if p is None or not p.is_file()]
        if missing:
            raise BenchError(f"--checkpoint and --onnx must both name files; not found: {missing}")
        rows, details["given"] = measure(args.checkpoint, args.onnx, args)
    else:
        with repo_copy() as copy:
            env = pipeline_env(copy)
            for model in args.models:
                print(f"{model}: imgclf params model={model} && dvc repro ...", flush=True)
                run(["imgclf", "params", f"model={model}"], copy, env)
                run(["dvc", "repro"], copy, env)
                model_rows, details[model] = measure(
                    copy / "models" / "model.ckpt", copy / "models" / "model.onnx", args
                )
                rows += model_rows
    write_result("onnx_vs_torch", rows, details)


if __name__ == "__main__":
    main_guard(main)
