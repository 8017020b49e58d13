"""The IDX sources, `mnist` and `fashion_mnist`: four gzip files each on public mirrors."""

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np

from imgclf.data.fetch import RemoteFile
from imgclf.data.sources.catalog import RawDataset, files_fetcher, from_files, register

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST format: magic, dims, big-endian sizes, then the data), gzip or not."""
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
    """Read the four IDX files; the t10k images are the official test split."""

    def read(raw_dir: Path) -> RawDataset:
        arrays = {key: read_idx(raw_dir / name) for key, name in IDX_FILES.items()}
        images = np.concatenate([arrays["train_images"], arrays["test_images"]])[:, None]
        labels = np.concatenate([arrays["train_labels"], arrays["test_labels"]]).astype(np.int64)
        official_test = np.zeros(len(labels), dtype=bool)
        official_test[len(arrays["train_labels"]) :] = True
        return RawDataset(np.ascontiguousarray(images), labels, classes, official_test)

    return read


# MNIST: the SHA-256 values are of the decompressed payloads, so a mirror that re-compressed the
# files still verifies.
MNIST_CLASSES = [str(d) for d in range(10)]
MNIST_FILES = {
    name: RemoteFile(name, payload_sha256=digest)
    for name, digest in {
        "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    }.items()
}

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

register("mnist", fetch=files_fetcher(MNIST_FILES), read=from_files(idx_reader(MNIST_CLASSES)))
register(
    "fashion_mnist",
    fetch=files_fetcher(FASHION_MNIST_FILES),
    read=from_files(idx_reader(FASHION_MNIST_CLASSES)),
)
