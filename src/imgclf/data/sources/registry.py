"""The registry of data sources: a name in `data.name` -> how to fetch it and how to read it back.

A source's `fetch` writes the data, as downloaded or materialised, into an empty folder; its
`read` turns that folder into canonical arrays for the normalize stage. New sources register
themselves with `@register`.
"""

import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.config import DataConfig
from imgclf.data.fetch import RemoteFile, fetch


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
    source: dict | None = None  # what the source files were (modes, sizes); None: as the arrays are
    bad_files: tuple[dict[str, str], ...] = ()  # files left out: {"path", "reason"}


Reader = Callable[[DataConfig, Path, Path], RawDataset]  # (config, raw folder, scratch folder)


@dataclass(frozen=True)
class DataSource:
    name: str
    fetch: Callable[[DataConfig, Path], None]
    read: Reader


SOURCES: dict[str, DataSource] = {}


def from_files(read: Callable[[Path], RawDataset]) -> Reader:
    """A reader for a published data set: its files say everything, so no config or scratch."""
    return lambda config, raw_dir, scratch: read(raw_dir)


def register(name: str, read: Reader):
    """Decorator: register `fetch` under `name`, with `read` to load what it wrote."""

    def wrap(fetch: Callable[[DataConfig, Path], None]) -> Callable[[DataConfig, Path], None]:
        SOURCES[name] = DataSource(name, fetch, read)
        return fetch

    return wrap


def source_summary(modes: dict[str, int], widths: np.ndarray, heights: np.ndarray) -> dict:
    """What a source's images were, for report.json: counts per mode, spread of sizes."""

    def spread(values: np.ndarray) -> dict[str, float]:
        return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}

    return {"images": len(widths), "modes": modes, "width": spread(widths), "height": spread(heights)}


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


@register("digits", read=from_files(read_digits))
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


def files_fetcher(files: dict[str, RemoteFile]) -> Callable[[DataConfig, Path], None]:
    """Fetch every file of `files` (looked up at call time) through the cache into the target."""

    def fetch_files(config: DataConfig, target: Path) -> None:
        cache = Path(config.cache_dir).expanduser() / config.name
        for name, remote in files.items():
            shutil.copyfile(fetch(remote, config.mirrors, cache), target / name)

    return fetch_files


# MNIST: verified by the SHA-256 of the decompressed payloads (../shared/README.md), so a mirror
# that re-compressed the files still verifies.
MNIST_FILES = {
    name: RemoteFile(name, payload_sha256=digest)
    for name, digest in {
        "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    }.items()
}
register("mnist", read=from_files(idx_reader([str(d) for d in range(10)])))(files_fetcher(MNIST_FILES))

# Fashion-MNIST: the gzip files as published, SHA-256 from TensorFlow Datasets'
# url_checksums/fashion_mnist.txt and MD5 from the Zalando README (also torchvision's).
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_FILES = {
    name: RemoteFile(name, sha256=sha256, md5=md5)
    for name, sha256, md5 in [
        (
            "train-images-idx3-ubyte.gz",
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        ),
        (
            "train-labels-idx1-ubyte.gz",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "25c81989df183df01b3e8a0aad5dffbe",
        ),
        (
            "t10k-images-idx3-ubyte.gz",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "bef4ecab320f06d8554ea6380940ec79",
        ),
        (
            "t10k-labels-idx1-ubyte.gz",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "bb300cfdad3c16e7a12a480ee83cd310",
        ),
    ]
}
read_fashion_mnist = from_files(idx_reader(FASHION_MNIST_CLASSES))
register("fashion_mnist", read=read_fashion_mnist)(files_fetcher(FASHION_MNIST_FILES))


# --- CIFAR-10: the official binary archive, read straight out of the tar ----------------------
# The Python version of the archive is pickles, and unpickling downloaded data runs its code.

CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-bin"
CIFAR10_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR10_TEST = "test_batch.bin"
CIFAR10_META = "batches.meta.txt"
CIFAR10_SHAPE = (3, 32, 32)
CIFAR10_RECORD = 1 + 3 * 32 * 32  # a label byte, then the R, G and B planes, each 32x32 row-major


def parse_cifar_batch(data: bytes, member: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, 32, 32) and int64 labels from one .bin member's bytes."""
    if not data or len(data) % CIFAR10_RECORD:
        raise ValueError(
            f"{member}: {len(data)} bytes is not a whole number of {CIFAR10_RECORD}-byte records"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
    # The planes are stored channel-first already: a reshape, no transpose.
    return records[:, 1:].reshape(-1, *CIFAR10_SHAPE), records[:, 0].astype(np.int64)


def read_cifar10(raw_dir: Path) -> RawDataset:
    archive = raw_dir / CIFAR10_ARCHIVE
    wanted = [*CIFAR10_TRAIN, CIFAR10_TEST, CIFAR10_META]
    paths = {f"{CIFAR10_FOLDER}/{name}": name for name in wanted}
    members: dict[str, bytes] = {}
    # One pass in archive order: looking members up by name would decompress the gzip stream
    # again for every member that lies behind the previous one. Nothing is written to disk.
    with tarfile.open(archive, "r:gz") as tar:
        for info in tar:
            path = info.name.removeprefix("./")
            if info.isfile() and path in paths:
                members[paths[path]] = tar.extractfile(info).read()
    missing = [name for name in wanted if name not in members]
    if missing:
        raise ValueError(f"{archive.name} lacks {', '.join(f'{CIFAR10_FOLDER}/{m}' for m in missing)}")
    classes = [line.strip() for line in members[CIFAR10_META].decode("ascii").splitlines() if line.strip()]
    batches = [parse_cifar_batch(members[name], name) for name in [*CIFAR10_TRAIN, CIFAR10_TEST]]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    if labels.max() >= len(classes):
        raise ValueError(
            f"{archive.name}: label {labels.max()} but {CIFAR10_META} names {len(classes)} classes"
        )
    official_test = np.zeros(len(labels), dtype=bool)
    official_test[len(labels) - len(batches[-1][1]) :] = True
    return RawDataset(images, labels, classes, official_test)


# SHA-256 and size (170,052,171 bytes) from TensorFlow Datasets' url_checksums/cifar10.txt;
# MD5 from the authors' page (https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR10_FILES = {
    CIFAR10_ARCHIVE: RemoteFile(
        CIFAR10_ARCHIVE,
        sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
        md5="c32a1d4ab5d03f1284b67883e8d87530",
    )
}
register("cifar10", read=from_files(read_cifar10))(files_fetcher(CIFAR10_FILES))

# Sources with a module of their own register themselves when imported.
import imgclf.data.imagefolder  # noqa: E402, F401
