"""int8 against float32, the same trained weights: speed, accuracy, agreement and size in ONNX Runtime.

The models: `--pipeline DIR` (repeatable) takes what a pipeline trained there (DIR/models/model.ckpt,
DIR/data/normalized, DIR/params.yaml; `--pipeline .` is this checkout's model, the default digits
MLP); `--mnist FOLDER` first trains the `mnist_cnn` recipe in a committed temporary copy of the
work tree, FOLDER (the four MNIST IDX files) being its mirror; `--set train.max_epochs=1` trains
fewer epochs. Both graphs come from the export stage's own functions: `to_onnx` (float32), then
`ship_int8` (calibration on the training split and the agreement gate, with the pipeline's
`export` settings and seed).

Speed: ONNX Runtime sessions with one intra-op thread (`imgclf serve`'s default), float32 and int8
taking turns for --rounds rounds so that both see the same load on shared cores; per round, the
median of --latency-runs batch-1 runs and the throughput of batches of 256 for --seconds. The
best round of each is reported (other work on the cores only ever adds time); every round is in
the JSON. Quality: the whole test split (MNIST: the 10,000 official test images). Sizes: the
serialized graphs (card included, no drift reference). The CPU's int8 instruction sets
(/proc/cpuinfo) are printed and recorded: int8 pays where the CPU has VNNI.
"""

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import BenchError, add_override_option, main_guard, row, write_result

from tests.support.repo import pipeline_env, repo_copy, run

LATENCY_SPEEDUP_TARGET = 1.5  # int8 over float32, batch 1, CNN
THROUGHPUT_SPEEDUP_TARGET = 1.6  # int8 over float32, batches of 256, CNN
ACCURACY_DROP_TARGET = 0.1  # points of test accuracy, at most
BATCH = 256
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu() -> dict:
    """The CPU's model name and which of the int8-relevant instruction sets it has."""
    info = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").is_file() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = fields.get("flags\t\t", fields.get("flags", "")).split()
    name = next((v.strip() for k, v in fields.items() if k.strip() == "model name"), "unknown")
    return {"model": name, **{flag: flag in flags for flag in CPU_FLAGS}}


def graphs(pipeline: Path) -> dict:
    """The float32 and int8 graphs of DIR's checkpoint, as the export stage makes them, and the data."""
    import torch

    from imgclf.card import NO_QUANTIZATION
    from imgclf.config.pipeline import load_pipeline
    from imgclf.data.normalized import load_split
    from imgclf.errors import ImgclfError
    from imgclf.models import load_checkpoint
    from imgclf.stages.export import EXAMPLE_BATCH, Probabilities, ship_int8, to_onnx

    config = load_pipeline(pipeline / "params.yaml")
    config = config.model_copy(update={"export": config.export.model_copy(update={"quantize": "int8"})})
    trained = load_checkpoint(pipeline / "models" / "model.ckpt")
    data = pipeline / "data" / "normalized"
    test, labels = load_split(data, "test")
    card = replace(trained.card, quantization=NO_QUANTIZATION)
    model = Probabilities(trained.net).eval()
    fp32 = to_onnx(model, torch.from_numpy(np.ascontiguousarray(test[:EXAMPLE_BATCH])), card)
    started = time.perf_counter()
    try:
        int8, _, agreement = ship_int8(config, fp32, card, load_split(data, "train")[0], test)
    except ImgclfError as error:
        raise BenchError(f"{pipeline}: {error}") from None
    return {
        "name": f"{config.data.name} {config.model.name}",
        "model": config.model.name,
        "graphs": {"fp32": fp32, "int8": int8},
        "test": test,
        "labels": labels,
        "agreement": agreement,
        "quantize_s": time.perf_counter() - started,
    }


def speed(graphs: dict, images: np.ndarray, args: argparse.Namespace) -> dict:
    """Best-round batch-1 latency p50 (ms) and batch throughput (images/s) of each graph, and every round."""
    from imgclf.runtime import inference_session

    sessions = {name: inference_session(g.SerializeToString(), threads=1) for name, g in graphs.items()}
    singles = [np.ascontiguousarray(images[i % len(images)][None]) for i in range(args.latency_runs)]
    batch = np.ascontiguousarray(np.resize(images, (BATCH, *images.shape[1:])))
    for session in sessions.values():  # warm-up
        for single in singles[:50]:
            session.run(None, {"image": single})
        session.run(None, {"image": batch})
    rounds = {name: {"latency_ms_p50_b1": [], f"throughput_b{BATCH}": []} for name in graphs}
    for _ in range(args.rounds):
        for name, session in sessions.items():
            timings = []
            for single in singles:
                started = time.perf_counter()
                session.run(None, {"image": single})
                timings.append(time.perf_counter() - started)
            rounds[name]["latency_ms_p50_b1"].append(float(np.median(timings)) * 1000)
            runs, started = 0, time.perf_counter()
            while runs < 3 or time.perf_counter() - started < args.seconds:
                session.run(None, {"image": batch})
                runs += 1
            rounds[name][f"throughput_b{BATCH}"].append(runs * BATCH / (time.perf_counter() - started))
    best = {
        name: {
            "latency_ms_p50_b1": min(r["latency_ms_p50_b1"]),
            f"throughput_b{BATCH}": max(r[f"throughput_b{BATCH}"]),
        }
        for name, r in rounds.items()
    }
    return {"best": best, "rounds": rounds}


def accuracy(graph, images: np.ndarray, labels: np.ndarray) -> float:
    from imgclf.runtime import inference_session, predict_probabilities

    predicted = predict_probabilities(inference_session(graph.SerializeToString()), images).argmax(axis=1)
    return float((predicted == labels).mean())


def measure(pipeline: Path, args: argparse.Namespace) -> tuple[list[dict], dict]:
    made = graphs(pipeline)
    name = made["name"]
    print(f"{name}: measuring ({args.rounds} rounds) ...", flush=True)
    timed = speed(made["graphs"], made["test"], args)
    best = timed["best"]
    acc = {k: accuracy(g, made["test"], made["labels"]) for k, g in made["graphs"].items()}
    agreement = made["agreement"]
    sizes = {k: len(g.SerializeToString()) / 1024 for k, g in made["graphs"].items()}
    cnn = made["model"] != "mlp"  # the targets are the convolutional networks'
    b1 = best["fp32"]["latency_ms_p50_b1"] / best["int8"]["latency_ms_p50_b1"]
    b256 = best["int8"][f"throughput_b{BATCH}"] / best["fp32"][f"throughput_b{BATCH}"]
    drop = (acc["fp32"] - acc["int8"]) * 100
    rows = [
        row(f"{name} fp32 latency p50 b1", round(best["fp32"]["latency_ms_p50_b1"], 4), "ms"),
        row(f"{name} int8 latency p50 b1", round(best["int8"]["latency_ms_p50_b1"], 4), "ms"),
        row(f"{name} int8 speed-up b1", round(b1, 2), "x", *((">=", LATENCY_SPEEDUP_TARGET) if cnn else ())),
        row(f"{name} fp32 throughput b{BATCH}", round(best["fp32"][f"throughput_b{BATCH}"]), "img/s"),
        row(f"{name} int8 throughput b{BATCH}", round(best["int8"][f"throughput_b{BATCH}"]), "img/s"),
        row(
            f"{name} int8 speed-up b{BATCH}",
            round(b256, 2),
            "x",
            *((">=", THROUGHPUT_SPEEDUP_TARGET) if cnn else ()),
        ),
        row(f"{name} fp32 test accuracy", round(acc["fp32"], 4)),
        row(f"{name} int8 test accuracy", round(acc["int8"], 4)),
        row(f"{name} int8 accuracy drop", round(drop, 3), "points", "<=", ACCURACY_DROP_TARGET),
        row(f"{name} int8 argmax agreement", round(agreement["int8_agreement"], 5)),
        row(f"{name} int8 max |dp|", round(agreement["int8_max_abs_diff"], 5)),
        row(f"{name} int8 mean |dp|", round(agreement["int8_mean_abs_diff"], 6)),
        row(f"{name} fp32 file", round(sizes["fp32"], 1), "KiB"),
        row(f"{name} int8 file", round(sizes["int8"], 1), "KiB"),
    ]
    details = {
        "pipeline": str(pipeline),
        "n_test": len(made["labels"]),
        "accuracy": acc,
        "agreement": agreement,
        "sizes_kib": sizes,
        "speed": timed,
        "quantize_s": made["quantize_s"],
    }
    return rows, details


def trained_recipe(folder: Path, copy: Path, overrides: list[str]) -> Path:
    """`imgclf params experiment=mnist_cnn` with FOLDER as the MNIST mirror, then `dvc repro train`."""
    if not list(folder.glob("*-ubyte.gz")):
        raise BenchError(f"no MNIST IDX files (*-ubyte.gz) in {folder}; pass --mnist <folder>")
    env = pipeline_env(copy)
    params = ["experiment=mnist_cnn", f"data.mirrors=[{folder.as_uri()}/]", *overrides]
    run(["imgclf", "params", *params], copy, env)
    print(f"imgclf params {' '.join(params)} && dvc repro train ...", flush=True)
    started = time.perf_counter()
    run(["dvc", "repro", "train"], copy, env)
    print(f"trained in {time.perf_counter() - started:.0f} s", flush=True)
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mnist", type=Path, help="folder with the four MNIST IDX .gz files: train the recipe"
    )
    parser.add_argument(
        "--pipeline", type=Path, action="append", default=[], help="a trained pipeline's folder"
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=0.3, help="of batches per throughput round")
    parser.add_argument("--keep", action="store_true", help="keep the copy the recipe was trained in")
    add_override_option(parser)
    args = parser.parse_args()
    if not args.mnist and not args.pipeline:
        raise BenchError("pass --mnist FOLDER (train the mnist_cnn recipe) and/or --pipeline DIR")
    processor = cpu()
    print(
        "CPU: "
        + processor["model"]
        + ", "
        + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in processor.items() if k != "model")
    )
    rows, details = [], {"cpu": processor, "overrides": args.set}
    for pipeline in args.pipeline:
        more, details[str(pipeline)] = measure(pipeline.resolve(), args)
        rows += more
    if args.mnist:
        with repo_copy(keep=args.keep) as copy:
            more, details["mnist_cnn"] = measure(trained_recipe(args.mnist.resolve(), copy, args.set), args)
            rows += more
    write_result("int8", rows, details)


if __name__ == "__main__":
    main_guard(main)
