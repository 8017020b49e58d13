"""The `cifar10` source: the official binary archive, read straight out of the tar.

The Python version of the archive is pickles, and unpickling downloaded data runs its code.
"""

import tarfile
from pathlib import Path

import numpy as np

from imgclf.data.fetch import RemoteFile
from imgclf.data.sources.catalog import RawDataset, files_fetcher, from_files, register

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

register("cifar10", fetch=files_fetcher(CIFAR10_FILES), read=from_files(read_cifar10))
