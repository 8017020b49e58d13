"""The registry of data sources: a name in `data.name` -> how to fetch it and how to read it back.

A source's `fetch` writes the data, as downloaded or materialised, into an empty folder; its
`read` turns that folder into canonical arrays for the normalize stage. New sources register
themselves with `@register`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.config import DataConfig


@dataclass(frozen=True)
class RawDataset:
    """A source's images as uint8 (N, C, H, W) in 0..255, integer labels and class names.

    `official_test`, when set, is a boolean mask of the images the source publishes as its test
    split; without one the normalize stage draws a seeded, stratified test split.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    official_test: np.ndarray | None = None


@dataclass(frozen=True)
class DataSource:
    name: str
    fetch: Callable[[DataConfig, Path], None]
    read: Callable[[Path], RawDataset]


SOURCES: dict[str, DataSource] = {}


def register(name: str, read: Callable[[Path], RawDataset]):
    """Decorator: register `fetch` under `name`, with `read` to load what it wrote."""

    def wrap(fetch: Callable[[DataConfig, Path], None]) -> Callable[[DataConfig, Path], None]:
        SOURCES[name] = DataSource(name, fetch, read)
        return fetch

    return wrap


def get_source(name: str) -> DataSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown data source {name!r}; known: {', '.join(sorted(SOURCES))}") from None


# --- digits: scikit-learn's 8x8 handwritten digits, shipped inside its wheel -------------------

DIGITS_MAX = 16  # digits pixels are counts of 0..16 set pixels in 4x4 blocks of a 32x32 bitmap


def read_digits(raw_dir: Path) -> RawDataset:
    counts = np.load(raw_dir / "images.npy", allow_pickle=False)
    labels = np.load(raw_dir / "labels.npy", allow_pickle=False)
    # Scale 0..16 to the canonical 0..255 so every source shares one pixel range.
    images = np.rint(counts.astype(np.float64) * (255 / DIGITS_MAX)).astype(np.uint8)
    return RawDataset(images[:, None, :, :], labels.astype(np.int64), [str(d) for d in range(10)])


@register("digits", read=read_digits)
def fetch_digits(config: DataConfig, target: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Plain .npy, not .npz: a zip stores timestamps, and the raw data must hash the same every time.
    np.save(target / "images.npy", digits.images.astype(np.uint8), allow_pickle=False)
    np.save(target / "labels.npy", digits.target.astype(np.uint8), allow_pickle=False)
