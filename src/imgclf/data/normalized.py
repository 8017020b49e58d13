"""data/normalized/, the normalize stage's output, as the later stages read it.

Layout:
    <split>/images.npy   uint8 (N, C, H, W), split in train, val, test
    <split>/labels.npy   int64 (N,)
    <split>/sizes.npy    int32 (N, 2): each image's (width, height) as its file was, before
                         resizing (the drift reference's upload size and aspect ratio)
    card.json            the model card: classes (index = label), input spec (mode, size and how
                         other sizes are fitted), normalisation (per-channel mean and std of the
                         train split, in pixel units); imgclf.card.ModelCard
    report.json          data checks: counts per split and class, value range, cross-split
                         duplicates, what the source images were (modes, sizes), the bad files

Its own module, apart from the code that writes it: train, export and evaluate depend on this
reader, and editing how normalize splits the data must not retrain the model.
"""

from pathlib import Path

import numpy as np

from imgclf.card import ModelCard
from imgclf.fileio import read_json

SPLITS = ("train", "val", "test")
CARD, REPORT = "card.json", "report.json"
SIZES = "sizes.npy"


def load_split(data_dir: Path, split: str, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split."""
    mode = "r" if mmap else None
    images = np.load(data_dir / split / "images.npy", mmap_mode=mode, allow_pickle=False)
    labels = np.load(data_dir / split / "labels.npy", allow_pickle=False)
    return images, labels


def load_sizes(data_dir: Path, split: str) -> np.ndarray | None:
    """Each image's (width, height) before resizing; None for data normalized without them."""
    path = data_dir / split / SIZES
    return np.load(path, allow_pickle=False) if path.is_file() else None


def load_card(data_dir: Path) -> ModelCard:
    """The model card normalize wrote: what a model trained on this data takes and answers."""
    return ModelCard.from_json(read_json(data_dir / CARD))
