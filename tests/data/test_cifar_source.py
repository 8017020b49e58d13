"""The CIFAR-10 source on a generated archive in the official binary format, over HTTP and file://."""

import hashlib
import io
import tarfile

import numpy as np
import pytest

from imgclf.config.pipeline import PublishedData
from imgclf.data.fetch import DownloadError, RemoteFile
from imgclf.data.sources import cifar10, get_source
from imgclf.data.sources.cifar10 import (
    CIFAR10_ARCHIVE,
    CIFAR10_FOLDER,
    CIFAR10_RECORD,
    parse_cifar_batch,
    read_cifar10,
)
from tests.conftest import data_config

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 10  # records in each of the five training batches and in the test batch
# A known image: red counts through the pixels in row-major order, green is its mirror image.
RED = (np.arange(32 * 32) % 256).astype(np.uint8).reshape(32, 32)
GREEN = 255 - RED
BLUE = np.full((32, 32), 7, dtype=np.uint8)


def record(label: int, image: np.ndarray) -> bytes:
    return bytes([label]) + image.tobytes()  # (3, 32, 32) C-order: the R, G, B planes in turn


def cifar_archive(
    members: dict[str, bytes] | None = None, per_batch: int = PER_BATCH
) -> tuple[bytes, dict[str, np.ndarray]]:
    """A cifar-10-binary.tar.gz with `per_batch` records per batch file, and the arrays it holds."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6 * per_batch, 3, 32, 32), dtype=np.uint8)
    images[per_batch * 5] = np.stack([RED, GREEN, BLUE])  # the first test image
    labels = np.arange(6 * per_batch) % 10
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    if members is None:
        members = {
            name: b"".join(record(labels[j], images[j]) for j in range(per_batch * i, per_batch * (i + 1)))
            for i, name in enumerate(names)
        }
        members["batches.meta.txt"] = ("\n".join(CLASSES) + "\n\n").encode()
        members["readme.html"] = b"<html>not read</html>"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{CIFAR10_FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), {"images": images, "labels": labels}


def publish(monkeypatch, archive: bytes) -> None:
    """Make the generated archive's digests the published ones."""
    digests = {"sha256": hashlib.sha256(archive).hexdigest(), "md5": hashlib.md5(archive).hexdigest()}
    monkeypatch.setitem(cifar10.CIFAR10_FILES, CIFAR10_ARCHIVE, RemoteFile(CIFAR10_ARCHIVE, **digests))


def fetch_and_read(config: PublishedData, raw):
    raw.mkdir(exist_ok=True)
    source = get_source("cifar10")
    source.fetch(config, raw)
    return source.read(config, raw, raw)  # scratch: unused by published sources


@pytest.fixture
def served(http_mirror, monkeypatch):
    archive, arrays = cifar_archive()
    http_mirror.files[CIFAR10_ARCHIVE] = archive
    publish(monkeypatch, archive)
    return arrays


def test_cifar10_over_http_resumes_and_reads_every_record(served, http_mirror, tmp_path):
    config = data_config("cifar10", mirrors=[http_mirror.mirror("cut")], cache_dir=str(tmp_path / "c"))
    dataset = fetch_and_read(config, tmp_path / "raw")
    assert http_mirror.ranges  # the cut transfer was resumed, not restarted
    assert dataset.images.shape == (60, 3, 32, 32) and dataset.images.dtype == np.uint8
    assert np.array_equal(dataset.images, served["images"])
    assert np.array_equal(dataset.labels, served["labels"])
    assert dataset.classes == CLASSES
    assert dataset.official_test.tolist() == [False] * 50 + [True] * 10


def test_pixel_planes_and_rows_keep_their_layout(served, http_mirror, tmp_path):
    config = data_config("cifar10", mirrors=[http_mirror.mirror()], cache_dir=str(tmp_path / "c"))
    red, green, blue = fetch_and_read(config, tmp_path / "raw").images[50]
    assert np.array_equal(red, RED) and np.array_equal(green, GREEN) and np.array_equal(blue, BLUE)
    assert (red[0, 1], red[1, 0], green[0, 1]) == (1, 32, 254)  # row-major, R before G


def test_file_mirror_then_the_cache_answers(tmp_path, monkeypatch):
    archive, arrays = cifar_archive()
    publish(monkeypatch, archive)
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / CIFAR10_ARCHIVE).write_bytes(archive)
    config = data_config(
        "cifar10", mirrors=[(tmp_path / "mirror").as_uri()], cache_dir=str(tmp_path / "cache")
    )
    assert np.array_equal(fetch_and_read(config, tmp_path / "raw1").labels, arrays["labels"])
    (tmp_path / "mirror" / CIFAR10_ARCHIVE).unlink()
    assert np.array_equal(fetch_and_read(config, tmp_path / "raw2").labels, arrays["labels"])


def test_download_and_normalize_keep_the_official_test_split(served, http_mirror, tmp_path):
    from imgclf.data.download import download
    from imgclf.data.normalize import normalize
    from imgclf.data.normalized import load_split

    config = data_config(
        "cifar10", mirrors=[http_mirror.mirror()], cache_dir=str(tmp_path / "c"), val_fraction=0.2
    )
    raw = download(config, tmp_path / "raw")
    normalize(config, 0, raw, tmp_path / "normalized")
    test_images, test_labels = load_split(tmp_path / "normalized", "test")
    assert np.array_equal(test_images, served["images"][50:])
    assert np.array_equal(test_labels, served["labels"][50:])
    assert len(load_split(tmp_path / "normalized", "val")[1]) == 10


def test_a_wrong_archive_is_refused_and_nothing_is_written(served, http_mirror, tmp_path, monkeypatch):
    monkeypatch.setitem(cifar10.CIFAR10_FILES, CIFAR10_ARCHIVE, RemoteFile(CIFAR10_ARCHIVE, md5="0" * 32))
    config = data_config("cifar10", mirrors=[http_mirror.mirror()], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch_and_read(config, tmp_path / "raw")
    assert list((tmp_path / "raw").iterdir()) == []
    assert list((tmp_path / "c" / "cifar10").iterdir()) == []


def test_a_missing_member_is_named(tmp_path):
    archive, _ = cifar_archive({"data_batch_1.bin": b"\0" * CIFAR10_RECORD})
    (tmp_path / CIFAR10_ARCHIVE).write_bytes(archive)
    with pytest.raises(ValueError, match=f"lacks {CIFAR10_FOLDER}/data_batch_2.bin"):
        read_cifar10(tmp_path)


def test_a_partial_record_is_refused():
    with pytest.raises(ValueError, match=r"test_batch\.bin: 3074 bytes is not a whole number of 3073-byte"):
        parse_cifar_batch(b"\0" * (CIFAR10_RECORD + 1), "test_batch.bin")
