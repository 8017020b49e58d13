import csv

import numpy as np
import pytest

from imgclf.evaluation import quality, write_confusion


def test_quality_metrics_on_known_predictions():
    labels = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0])
    metrics, per_class = quality(labels, predicted, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    assert metrics["n_test"] == 6
    assert set(metrics) == {"accuracy", "macro_f1", "n_test"}  # headline only: dvc exp show stays readable
    assert [row["class"] for row in per_class] == ["a", "b", "c"]
    assert per_class[1] == {
        "class": "b",
        "precision": pytest.approx(2 / 3, abs=1e-6),
        "recall": 1.0,
        "f1": pytest.approx(0.8, abs=1e-6),
        "support": 2,
    }
    assert per_class[2]["recall"] == 0.5
    # F1 per class: a (P 1/2, R 1/2) 0.5; b (P 2/3, R 1) 0.8; c (P 1, R 1/2) 2/3
    assert metrics["macro_f1"] == pytest.approx(np.mean([0.5, 0.8, 2 / 3]), abs=1e-6)


def test_confusion_csv_has_one_row_per_image(tmp_path):
    labels, predicted = np.array([0, 1, 1]), np.array([0, 0, 1])
    write_confusion(labels, predicted, ["cat", "dog"], tmp_path / "c.csv", tmp_path / "c.png")
    rows = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert rows == [
        {"actual": "cat", "predicted": "cat"},
        {"actual": "dog", "predicted": "cat"},
        {"actual": "dog", "predicted": "dog"},
    ]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
