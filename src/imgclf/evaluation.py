"""The evaluate stage: the exported ONNX model, run by ONNX Runtime, on the test split.

This is what will be served, so it is what is measured: quality (accuracy, macro F1, per-class
precision and recall) and speed (batch-1 latency, large-batch throughput).
"""

import csv
import time
from pathlib import Path

import numpy as np

from imgclf import tracking
from imgclf.config import Config
from imgclf.data.normalized import load_card, load_split
from imgclf.fileio import atomic_path, read_json, write_json
from imgclf.runtime import inference_session, predict_probabilities


def quality(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    indices = list(range(len(classes)))
    precision, recall, _, support = precision_recall_fscore_support(
        labels, predicted, labels=indices, zero_division=0
    )
    return {
        "accuracy": round(float(accuracy_score(labels, predicted)), 6),
        "macro_f1": round(float(f1_score(labels, predicted, labels=indices, average="macro")), 6),
        "n_test": len(labels),
        "per_class": {
            name: {
                "precision": round(float(precision[i]), 6),
                "recall": round(float(recall[i]), 6),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
    }


def speed(session, images: np.ndarray, latency_runs: int, throughput_batch: int) -> dict:
    """Batch-1 latency percentiles and the throughput of full batches, after a warm-up."""
    input_name = session.get_inputs()[0].name
    singles = [np.ascontiguousarray(images[i % len(images)][None]) for i in range(latency_runs)]
    for single in singles[:10]:
        session.run(None, {input_name: single})
    timings = []
    for single in singles:
        started = time.perf_counter()
        session.run(None, {input_name: single})
        timings.append((time.perf_counter() - started) * 1000)

    repeats = max(1, -(-throughput_batch // len(images)))
    batch = np.ascontiguousarray(np.concatenate([images] * repeats)[:throughput_batch])
    session.run(None, {input_name: batch})
    runs, started = 0, time.perf_counter()
    while runs < 5 or time.perf_counter() - started < 1.0:
        session.run(None, {input_name: batch})
        runs += 1
    seconds = time.perf_counter() - started
    return {
        "latency_ms_p50_b1": round(float(np.percentile(timings, 50)), 4),
        "latency_ms_p99_b1": round(float(np.percentile(timings, 99)), 4),
        f"throughput_b{throughput_batch}": round(runs * len(batch) / seconds, 1),
    }


def write_confusion(labels, predicted, classes: list[str], csv_path: Path, png_path: Path) -> None:
    """One row per test image (actual, predicted) for `dvc plots`, and a PNG matrix."""
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(labels, predicted, strict=True))

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(5, 0.5 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        labels, predicted, labels=range(len(classes)), display_labels=classes, ax=ax, colorbar=False
    )
    ax.set_title("confusion matrix (test split, ONNX Runtime)")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def evaluate(
    config: Config,
    model_path: Path,
    sidecar_path: Path,
    data_dir: Path,
    metrics_out: Path,
    plots_dir: Path,
) -> dict:
    """Write metrics/eval.json and the confusion matrix; log both to the pipeline's MLflow run."""
    classes = list(load_card(data_dir).classes)
    images, labels = load_split(data_dir, "test")
    session = inference_session(model_path)
    predicted = predict_probabilities(session, images).argmax(axis=1)
    metrics = quality(labels, predicted, classes)
    metrics |= speed(session, images, config.evaluate.latency_runs, config.evaluate.throughput_batch)
    write_json(metrics_out, metrics)
    confusion_csv, confusion_png = plots_dir / "confusion.csv", plots_dir / "confusion.png"
    write_confusion(labels, predicted, classes, confusion_csv, confusion_png)

    run_id = read_json(sidecar_path)["lineage"]["mlflow_run_id"]
    if tracking.existing_run(config, run_id):
        flat = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
        flat |= {
            f"test_{stat}_{name}": values[stat]
            for name, values in metrics["per_class"].items()
            for stat in ("precision", "recall")
        }
        tracking.log_metrics(config, run_id, flat)
        tracking.log_artifacts(config, run_id, [metrics_out])
        tracking.log_artifacts(config, run_id, [confusion_png], "plots")
    return metrics
