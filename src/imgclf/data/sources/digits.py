"""The `digits` source: scikit-learn's 8x8 handwritten digits, shipped inside its wheel."""

import importlib.util
from pathlib import Path

import numpy as np

from imgclf.config.pipeline import DataConfig
from imgclf.data.sources.catalog import RawDataset, from_files, register
from imgclf.errors import ImgclfError

DIGITS_MAX = 16  # digits pixels are counts of 0..16 set pixels in 4x4 blocks of a 32x32 bitmap


def digits_file() -> Path:
    """The CSV that `sklearn.datasets.load_digits` reads, found without importing scikit-learn
    (1.5 s): 1,797 rows of 64 pixel counts and the digit."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise ImgclfError("the digits data set ships with scikit-learn: pip install scikit-learn")
    return path


def fetch_digits(config: DataConfig, target: Path) -> None:
    table = np.loadtxt(digits_file(), delimiter=",", dtype=np.uint8)
    # Plain .npy, not .npz: a zip stores timestamps, and the raw data must hash the same every time.
    np.save(target / "images.npy", table[:, :-1].reshape(-1, 8, 8), allow_pickle=False)
    np.save(target / "labels.npy", table[:, -1], allow_pickle=False)


def read_digits(raw_dir: Path) -> RawDataset:
    counts = np.load(raw_dir / "images.npy", allow_pickle=False)
    labels = np.load(raw_dir / "labels.npy", allow_pickle=False)
    # Scale 0..16 to the canonical 0..255 so every source shares one pixel range.
    images = np.rint(counts.astype(np.float64) * (255 / DIGITS_MAX)).astype(np.uint8)
    return RawDataset(images[:, None, :, :], labels.astype(np.int64), [str(d) for d in range(10)])


register("digits", fetch=fetch_digits, read=from_files(read_digits))
