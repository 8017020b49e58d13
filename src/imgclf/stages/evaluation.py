"""The evaluate stage: the exported ONNX model, run by ONNX Runtime, on the test split.

This is what will be served, so it is what is measured: quality (accuracy, macro F1, per-class
precision and recall) and speed (batch-1 latency, large-batch throughput).
"""

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from imgclf.config.pipeline import PipelineConfig
from imgclf.data.normalized import load_card, load_split
from imgclf.fileio import atomic_path, write_json
from imgclf.runtime import inference_session, predict_probabilities
from imgclf.tracking import client as tracking
from imgclf.tracking.local import file_sha256, read_record, write_record
from imgclf.tracking.plots import draw_confusion
from imgclf.tracking.worker import Tracker

PER_CLASS = "per_class.csv"  # in the plots folder
SPEED = ("latency_", "throughput_")  # the keys of `speed`
THROUGHPUT_SECONDS = 0.25  # full batches run at least this long, and at least 5 times


class Scores(NamedTuple):
    metrics: dict  # the quality (metrics/eval.json) and the speed (metrics/local/eval.json)
    per_class: list[dict]  # plots/per_class.csv's rows
    labels: np.ndarray
    predicted: np.ndarray


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts of (actual, predicted) pairs: rows are the actual class, columns the predicted one."""
    return np.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes).reshape(n_classes, -1)


def quality(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> tuple[dict, list[dict]]:
    """The headline numbers (metrics/eval.json) and one row per class (plots/per_class.csv).

    Precision, recall and F1 are 0 where undefined (a class never predicted, or absent), as
    scikit-learn's `zero_division=0` gives them; macro F1 averages over every class.
    """
    matrix = confusion_matrix(labels, predicted, len(classes)).astype(np.float64)
    hits, support, claimed = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(claimed > 0, hits / claimed, 0.0)
        recall = np.where(support > 0, hits / support, 0.0)
        both = precision + recall
        f1 = np.where(both > 0, 2 * precision * recall / both, 0.0)
    headline = {
        "accuracy": round(float(hits.sum() / len(labels)), 6),
        "macro_f1": round(float(f1.mean()), 6),
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
    while runs < 5 or time.perf_counter() - started < THROUGHPUT_SECONDS:
        session.run(None, {input_name: batch})
        runs += 1
    seconds = time.perf_counter() - started
    return {
        "latency_ms_p50_b1": round(float(np.percentile(timings, 50)), 4),
        "latency_ms_p99_b1": round(float(np.percentile(timings, 99)), 4),
        f"throughput_b{throughput_batch}": round(runs * len(batch) / seconds, 1),
    }


def write_confusion(labels, predicted, classes: list[str], csv_path: Path) -> None:
    """One row per test image (actual, predicted), for `dvc plots`' confusion template."""
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(labels, predicted, strict=True))


@dataclass(frozen=True)
class EvalPaths:
    """What the evaluate stage reads and writes: its `cmd:` in dvc.yaml names each."""

    params: Path
    onnx: Path
    sidecar: Path  # models/model.json
    data: Path  # data/normalized: the test split
    metrics: Path  # metrics/eval.json: the quality the same model always has (git-tracked)
    plots: Path  # per-class scores and the confusion matrix
    run_record: Path | None = None  # models/run.json: the MLflow run to log to (git-ignored)
    local_metrics: Path | None = None  # metrics/local/eval.json: this machine's speed (git-ignored)


def evaluate(config: PipelineConfig, paths: EvalPaths, tracker: Tracker) -> dict:
    """Write metrics/eval.json (the quality: accuracy, macro F1), per-class scores and the
    confusion matrix, and this machine's speed beside them (git-ignored); log them all to the
    pipeline's MLflow run: the one models/run.json names for this very ONNX file, else the run
    that logged a file with its SHA-256 (outputs restored by DVC), else none."""
    onnx_sha256 = file_sha256(paths.onnx)
    made_by = read_record(paths.run_record, onnx_sha256=onnx_sha256) if paths.run_record else {}
    tracker.follow(tracking.model_run, made_by.get("mlflow_run_id"), onnx_sha256)
    with tracker.run_status():
        # Speed is timed once the tracking worker is idle: the timings share the CPU with nothing.
        scores = score(
            paths.onnx,
            paths.data,
            config.evaluate.latency_runs,
            config.evaluate.throughput_batch,
            before_speed=lambda scores: _write_quality(tracker, scores, paths.plots),
        )
        quality = {k: v for k, v in scores.metrics.items() if not k.startswith(SPEED)}
        timings = {k: v for k, v in scores.metrics.items() if k.startswith(SPEED)}
        write_json(paths.metrics, quality)
        if paths.local_metrics:
            write_record(paths.local_metrics, {**timings, "onnx_sha256": onnx_sha256})
        tracker.log(tracking.log_metrics, {f"test_{k}": v for k, v in timings.items()})
        tracker.log(tracking.log_artifacts, [paths.metrics])
    return scores.metrics


def score(
    model_path: Path,
    data_dir: Path,
    latency_runs: int,
    throughput_batch: int,
    before_speed: Callable[[Scores], None] = lambda scores: None,
) -> Scores:
    """The test split's quality and speed for one ONNX model: the evaluate stage's numbers, also
    used to score the champion on a challenger's split (imgclf.registry.scoring)."""
    classes = list(load_card(data_dir).classes)
    images, labels = load_split(data_dir, "test")
    session = inference_session(model_path)
    predicted = predict_probabilities(session, images).argmax(axis=1)
    metrics, per_class = quality(labels, predicted, classes)
    scores = Scores(metrics, per_class, labels, predicted)
    before_speed(scores)
    metrics |= speed(session, images, latency_runs, throughput_batch)
    return scores


def _write_quality(tracker: Tracker, scores: Scores, plots_dir: Path) -> None:
    """The per-class and confusion outputs; their MLflow metrics and plots, then wait until logged."""
    classes = [row["class"] for row in scores.per_class]
    per_class_csv = plots_dir / PER_CLASS
    write_per_class(scores.per_class, per_class_csv)
    confusion_csv, confusion_png = plots_dir / "confusion.csv", plots_dir / "confusion.png"
    write_confusion(scores.labels, scores.predicted, classes, confusion_csv)
    matrix = confusion_matrix(scores.labels, scores.predicted, len(classes))
    tracker.submit(draw_confusion, matrix.tolist(), classes, confusion_png)
    flat = {f"test_{k}": v for k, v in scores.metrics.items()}  # the quality: speed comes later
    # Class names are the user's folder names; MLflow keys allow fewer characters: the index
    # keeps two names that differ only there apart, and per_class.csv keeps the names as they are.
    flat |= {
        f"test_{stat}/{i}_{tracking.metric_key(row['class'])}": row[stat]
        for i, row in enumerate(scores.per_class)
        for stat in ("precision", "recall")
    }
    tracker.log(tracking.log_metrics, flat)
    tracker.log(tracking.log_artifacts, [per_class_csv])
    tracker.log(tracking.log_artifacts, [confusion_png], "plots")
    tracker.wait()
