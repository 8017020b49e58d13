"""The drift monitor's error rates and cost: windows of 200 from the held-out test split against
the validation reference that the export stage stored in the model.

In a committed temporary copy of the work tree, `dvc repro` (digits, or `--data mnist` with the
real MNIST files of `--mnist FOLDER` as a file:// mirror and the mnist_cnn recipe), or the
pipeline already run in `--pipeline FOLDER`. Then, with the exported ONNX model and
data/normalized/test:
- no shift: WINDOWS windows of WINDOW images drawn with replacement from the test split (a fixed
  seed); the share of windows with any alarm is the false-alarm rate (target <= 1 %);
- each shift, applied to the test images first: classes 0-4 only, darker (x0.6), inverted
  (255 - x), gaussian noise (sigma 40), a one-pixel shift to the right; and to the uploads'
  sizes before resizing (data/normalized's sizes.npy), the pixels unchanged: uploads 4x larger,
  uploads widened to 4:3: the share of windows that alarm is the detection rate (target >= 95 %
  each);
- the CPU time of one window's tests (target <= 1 ms), and of a request's hand-over to the
  monitor (DriftMonitor.observe) and a window's per-image numbers, for the record.
"""

import argparse
import time
from pathlib import Path

import numpy as np
from common import BenchError, main_guard, row, write_result

from tests.support.repo import pipeline_env, repo_copy, run

WINDOW, WINDOWS, SEED = 200, 200, 0
FALSE_ALARM_TARGET, DETECTION_TARGET, WINDOW_CPU_TARGET_MS = 0.01, 0.95, 1.0


def shift_one_pixel(images: np.ndarray) -> np.ndarray:
    """Each image moved one pixel to the right, its left column repeated."""
    return np.concatenate([images[..., :1], images[..., :-1]], axis=-1)


Condition = tuple[np.ndarray, np.ndarray, np.ndarray]  # images, labels, sizes before resizing


def shifts(images: np.ndarray, labels: np.ndarray, sizes: np.ndarray, rng) -> dict[str, Condition]:
    noise = rng.normal(0, 40, size=images.shape)
    wider = np.stack([np.round(sizes[:, 1] * 4 / 3), sizes[:, 1]], axis=1)
    return {
        "classes 0-4 only": (images[labels < 5], labels[labels < 5], sizes[labels < 5]),
        "darker x0.6": (np.round(images * 0.6).astype(np.uint8), labels, sizes),
        "inverted": (255 - images, labels, sizes),
        "noise sigma 40": (np.clip(np.round(images + noise), 0, 255).astype(np.uint8), labels, sizes),
        "1-pixel shift": (shift_one_pixel(images), labels, sizes),
        "uploads 4x larger": (images, labels, sizes * 4),
        "uploads widened to 4:3": (images, labels, wider),
    }


def alarm_rate(test, values: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[float, dict, float]:
    """(share of windows with an alarm, alarms per signal, CPU seconds per window's tests)."""
    from imgclf.drift.monitor import take

    n = len(values["class"])
    alarmed, per_signal, cpu = 0, {}, 0.0
    for _ in range(WINDOWS):
        pick = rng.integers(0, n, size=WINDOW)
        window = take({name: array[pick] for name, array in values.items()}, 0, WINDOW)
        started = time.process_time()
        results = test.test(window)
        cpu += time.process_time() - started
        alarmed += any(r.alarm for r in results.values())
        for name, result in results.items():
            per_signal[name] = per_signal.get(name, 0) + result.alarm
    return alarmed / WINDOWS, per_signal, cpu / WINDOWS


def hand_over_cost(reference, condition: Condition, probabilities: np.ndarray) -> tuple[float, float]:
    """(CPU microseconds per one-image DriftMonitor.observe, CPU milliseconds of a window's
    per-image numbers) over many windows, as a server feeds it."""
    from imgclf.drift.monitor import DriftMonitor
    from imgclf.drift.reference import image_signals

    images, _, sizes = condition
    monitor = DriftMonitor(WINDOW)
    monitor.start(reference, "bench")
    n = 20 * WINDOW
    singles = [
        (images[i % len(images)][None], probabilities[i % len(images)][None], sizes[i % len(images)][None])
        for i in range(n)
    ]
    started = time.process_time()
    for one, p, size in singles:
        monitor.observe(one, p, size)
    total = time.process_time() - started
    batch = images[np.arange(WINDOW) % len(images)]
    started = time.process_time()
    for _ in range(50):
        image_signals(
            batch, probabilities[np.arange(WINDOW) % len(images)], sizes[np.arange(WINDOW) % len(images)]
        )
    numbers = (time.process_time() - started) / 50
    return total / n * 1e6, numbers * 1e3


def measure(pipeline: Path) -> tuple[list[dict], dict]:
    from imgclf.data.normalized import load_sizes, load_split
    from imgclf.drift.monitor import WindowTest
    from imgclf.drift.reference import image_signals, read_reference
    from imgclf.runtime import inference_session, predict_probabilities

    session = inference_session(pipeline / "models" / "model.onnx")
    reference = read_reference(session.get_modelmeta().custom_metadata_map)
    if reference is None:
        raise BenchError(
            f"{pipeline / 'models' / 'model.onnx'} has no drift reference: re-run its export stage"
        )
    images, labels = load_split(pipeline / "data" / "normalized", "test")
    sizes = load_sizes(pipeline / "data" / "normalized", "test")
    if sizes is None or "size" not in reference.distributions:
        raise BenchError(f"{pipeline / 'data' / 'normalized'} has no sizes.npy: re-run its normalize stage")
    test = WindowTest(reference, WINDOW)
    rng = np.random.default_rng(SEED)
    conditions = {"no shift": (images, labels, sizes), **shifts(images, labels, sizes, rng)}
    rows, details = [], {"window": WINDOW, "windows": WINDOWS, "seed": SEED, "test_images": len(images)}
    details["reference"] = reference.summary()
    cpu_per_window = []
    for name, (shifted, truth, uploaded) in conditions.items():
        probabilities = predict_probabilities(session, shifted)
        values = image_signals(shifted, probabilities, uploaded)
        rate, per_signal, cpu = alarm_rate(test, values, rng)
        cpu_per_window.append(cpu)
        if name == "no shift":
            rows.append(row("false alarms, no shift", rate, "", "<=", FALSE_ALARM_TARGET))
            observe_us, numbers_ms = hand_over_cost(reference, conditions[name], probabilities)
        else:
            rows.append(row(f"detection, {name}", rate, "", ">=", DETECTION_TARGET))
        accuracy = float((probabilities.argmax(1) == truth).mean())
        details[name] = {"alarm_rate": rate, "alarms_per_signal": per_signal, "accuracy": accuracy}
        print(f"{name}: alarms in {rate:.1%} of windows, per signal {per_signal}", flush=True)
    worst_ms = max(cpu_per_window) * 1e3
    rows.append(
        row("CPU per window's tests (worst condition)", round(worst_ms, 3), "ms", "<=", WINDOW_CPU_TARGET_MS)
    )
    rows.append(row("CPU per window's per-image numbers", round(numbers_ms, 3), "ms"))
    rows.append(row("CPU per one-image request handed to the monitor", round(observe_us, 2), "us"))
    return rows, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--mnist", help="with --data mnist: the folder with the four MNIST IDX .gz files")
    parser.add_argument(
        "--pipeline", help="a folder where the pipeline has run (models/, data/): skip running it"
    )
    args = parser.parse_args()
    overrides = []
    if args.data == "mnist":
        folder = Path(args.mnist or "").resolve()
        if not args.mnist or not list(folder.glob("*-ubyte.gz")):
            raise BenchError(
                f"--data mnist needs --mnist FOLDER with the MNIST IDX files (*-ubyte.gz); got {args.mnist!r}"
            )
        overrides = ["experiment=mnist_cnn", f"data.mirrors=[{folder.as_uri()}/]"]
    if args.pipeline:
        rows, details = measure(Path(args.pipeline))
    else:
        with repo_copy() as copy:
            env = pipeline_env(copy)
            if overrides:
                run(["imgclf", "params", *overrides], copy, env)
            print(f"imgclf params {' '.join(overrides)} && dvc repro ...", flush=True)
            run(["dvc", "repro"], copy, env)
            rows, details = measure(copy)
    details["data"], details["overrides"] = args.data, overrides
    write_result("drift" if args.data == "digits" else f"drift_{args.data}", rows, details)


if __name__ == "__main__":
    main_guard(main)
