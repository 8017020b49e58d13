"""The PNG plots of the train and evaluate stages (matplotlib, drawn by the tracking process).

`dvc plots` draws the CSVs itself; these PNGs are for the MLflow run and for a quick look.
"""

import os
from pathlib import Path

from imgclf.fileio import atomic_path


def pyplot():
    """matplotlib's pyplot, drawing to files only. Its font cache goes to imgclf's cache folder
    ($XDG_CACHE_HOME/imgclf/matplotlib, else ~/.cache/imgclf/matplotlib) unless MPLCONFIGDIR says
    otherwise, rather than into ~/.cache/matplotlib and ~/.config/matplotlib."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgclf" / "matplotlib"
    os.environ.setdefault("MPLCONFIGDIR", str(cache))
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def draw_curves(rows: list[dict[str, float]], png_path: Path) -> None:
    """Loss and accuracy per epoch, train and val, side by side."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in rows]
    for split in ("train", "val"):
        left.plot(epochs, [row.get(f"{split}_loss") for row in rows], label=split)
        right.plot(epochs, [row.get(f"{split}_acc") for row in rows], label=split)
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    right.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    left.legend()
    right.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def draw_confusion(matrix: list[list[int]], classes: list[str], png_path: Path) -> None:
    """The confusion matrix (rows: actual class, columns: predicted), counts in the cells."""
    plt = pyplot()
    size = max(5, 0.5 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="viridis")
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            color = "black" if count > peak / 2 else "white"
            ax.text(j, i, str(count), ha="center", va="center", color=color)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45 if max(map(len, classes), default=0) > 3 else 0)
    ax.set_yticks(ticks, classes)
    ax.set(xlabel="Predicted label", ylabel="True label", title="confusion matrix (test split, ONNX Runtime)")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
