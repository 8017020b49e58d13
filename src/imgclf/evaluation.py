"""The evaluate stage: the exported ONNX model, run by ONNX Runtime, on the test split.

This is what will be served, so it is what is measured: quality (accuracy, macro F1, per-class
precision and recall) and speed (batch-1 latency, large-batch throughput).
"""

import csv
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from imgclf import tracking
from imgclf.config import Config
from imgclf.data.normalized import load_card, load_split
from imgclf.fileio import atomic_path, read_json, write_json
from imgclf.runtime import inference_session, predict_probabilities

PER_CLASS = "per_class.csv"  # in the plots folder


class Scores(NamedTuple):
    metrics: dict  # metrics/eval.json's headline numbers
    per_class: list[dict]  # plots/per_class.csv's rows
    labels: np.ndarray
    predicted: np.ndarray


def quality(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> tuple[dict, list[dict]]:
    """The headline numbers (metrics/eval.json) and one row per class (plots/per_class.csv)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    indices = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=indices, zero_division=0
    )
    headline = {
        "accuracy": round(float(accuracy_score(labels, predicted)), 6),
        "macro_f1": round(float(f1_score(labels, predicted, labels=indices, average="macro")), 6),
        "n_test": len(labels),
    }
    per_class = [
        {
            "class": name,
            "precision": round(float(precision[i]), 6),
            "recall": round(float(recall[i]), 6),
            "f1": round(float(f1[i]), 6),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    ]
    return headline, per_class


def write_per_class(rows: list[dict], csv_path: Path) -> None:
    """Precision, recall, F1 and support per class, for `dvc plots` and the MLflow run."""
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


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
    """Write metrics/eval.json (headline numbers), per-class scores and the confusion matrix;
    log them to the pipeline's MLflow run."""
    run_id = tracking.existing_run(config, read_json(sidecar_path)["lineage"]["mlflow_run_id"])
    if run_id is None:  # outputs restored by DVC from a store that no longer has the run
        return _evaluate(config, model_path, data_dir, metrics_out, plots_dir, None)
    with tracking.run_status(config, run_id, finish=True):
        return _evaluate(config, model_path, data_dir, metrics_out, plots_dir, run_id)


def score(model_path: Path, data_dir: Path, latency_runs: int, throughput_batch: int) -> Scores:
    """The test split's quality and speed for one ONNX model: the evaluate stage's numbers, also
    used to score the champion on a challenger's split (imgclf.promotion)."""
    classes = list(load_card(data_dir).classes)
    images, labels = load_split(data_dir, "test")
    session = inference_session(model_path)
    predicted = predict_probabilities(session, images).argmax(axis=1)
    metrics, per_class = quality(labels, predicted, classes)
    metrics |= speed(session, images, latency_runs, throughput_batch)
    return Scores(metrics, per_class, labels, predicted)


def _evaluate(config, model_path, data_dir, metrics_out: Path, plots_dir: Path, run_id: str | None) -> dict:
    classes = list(load_card(data_dir).classes)
    metrics, per_class, labels, predicted = score(
        model_path, data_dir, config.evaluate.latency_runs, config.evaluate.throughput_batch
    )
    write_json(metrics_out, metrics)
    per_class_csv = plots_dir / PER_CLASS
    write_per_class(per_class, per_class_csv)
    confusion_csv, confusion_png = plots_dir / "confusion.csv", plots_dir / "confusion.png"
    write_confusion(labels, predicted, classes, confusion_csv, confusion_png)
    if run_id is None:
        return metrics
    flat = {f"test_{k}": v for k, v in metrics.items()}
    # Class names are the user's folder names; MLflow keys allow fewer characters: the index
    # keeps two names that differ only there apart, and per_class.csv keeps the names as they are.
    flat |= {
        f"test_{stat}/{i}_{tracking.metric_key(row['class'])}": row[stat]
        for i, row in enumerate(per_class)
        for stat in ("precision", "recall")
    }
    tracking.log_metrics(config, run_id, flat)
    tracking.log_artifacts(config, run_id, [metrics_out, per_class_csv])
    tracking.log_artifacts(config, run_id, [confusion_png], "plots")
    return metrics
