"""The registry of data sources: a name in `data.name` -> how to fetch it and how to read it back.

A source's `fetch` writes the data, as downloaded or materialised, into an empty folder; its
`read` turns that folder into canonical arrays for the normalize stage. New sources register
themselves with `@register`.
"""

import shutil
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


# --- IDX data sets (MNIST, Fashion-MNIST): four gzip files on public mirrors ------------------

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST format: magic, dims, big-endian sizes, then the data), gzip or not."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path.name} is not a uint8 IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path.name}: header says {shape}, body has {body.size} values")
    return body.reshape(shape)


def idx_reader(classes: list[str]) -> Callable[[Path], RawDataset]:
    def read(raw_dir: Path) -> RawDataset:
        arrays = {key: read_idx(raw_dir / name) for key, name in IDX_FILES.items()}
        images = np.concatenate([arrays["train_images"], arrays["test_images"]])[:, None]
        labels = np.concatenate([arrays["train_labels"], arrays["test_labels"]]).astype(np.int64)
        official_test = np.zeros(len(labels), dtype=bool)
        official_test[len(arrays["train_labels"]) :] = True
        return RawDataset(np.ascontiguousarray(images), labels, classes, official_test)

    return read


def idx_fetcher(checksums: dict[str, str]) -> Callable[[DataConfig, Path], None]:
    """Fetch the four IDX files, verified by the SHA-256 of their decompressed payloads."""

    def fetch_idx(config: DataConfig, target: Path) -> None:
        from imgclf.data.fetch import RemoteFile, fetch

        cache = Path(config.cache_dir).expanduser() / config.name
        for name in IDX_FILES.values():
            remote = RemoteFile(name, payload_sha256=checksums[name])
            shutil.copyfile(fetch(remote, config.mirrors, cache), target / name)

    return fetch_idx


MNIST_PAYLOAD_SHA256 = {
    "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
register("mnist", read=idx_reader([str(d) for d in range(10)]))(idx_fetcher(MNIST_PAYLOAD_SHA256))
