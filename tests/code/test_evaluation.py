import csv

import numpy as np
import pytest

from imgclf.stages.evaluation import confusion_matrix, quality, write_confusion
from imgclf.tracking.plots import draw_confusion


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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quality_matches_scikit_learn_also_for_absent_and_never_predicted_classes(seed):
    """The numpy metrics are scikit-learn's (which evaluate no longer imports), zero_division=0."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, 200)  # class 5 never occurs
    predicted = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 6, 200))
    predicted[predicted == 4] = 3  # class 4 is never predicted
    classes = list("abcdef")
    metrics, per_class = quality(labels, predicted, classes)
    indices = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=indices, zero_division=0
    )
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-6)
    expected_macro = f1_score(labels, predicted, labels=indices, average="macro", zero_division=0)
    assert metrics["macro_f1"] == pytest.approx(expected_macro, abs=1e-6)
    for i, row in enumerate(per_class):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == (
            pytest.approx(precision[i], abs=1e-6),
            pytest.approx(recall[i], abs=1e-6),
            pytest.approx(f1[i], abs=1e-6),
            support[i],
        )


def test_confusion_matrix_counts_actual_by_predicted():
    matrix = confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 0, 1, 2]), 3)
    assert matrix.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_confusion_csv_has_one_row_per_image_and_the_png_is_drawn(tmp_path):
    labels, predicted = np.array([0, 1, 1]), np.array([0, 0, 1])
    write_confusion(labels, predicted, ["cat", "dog"], tmp_path / "c.csv")
    rows = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert rows == [
        {"actual": "cat", "predicted": "cat"},
        {"actual": "dog", "predicted": "cat"},
        {"actual": "dog", "predicted": "dog"},
    ]
    draw_confusion(confusion_matrix(labels, predicted, 2).tolist(), ["cat", "dog"], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
