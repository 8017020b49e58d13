"""The IDX sources (MNIST, Fashion-MNIST) on generated IDX files, from file:// and HTTP mirrors."""

import gzip
import hashlib

import numpy as np
import pytest

from imgclf.data.fetch import DownloadError, RemoteFile
from imgclf.data.sources import get_source, idx
from imgclf.data.sources.catalog import files_fetcher
from imgclf.data.sources.idx import IDX_FILES, idx_reader, read_idx
from tests.conftest import data_config


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def generated_idx(n_train: int = 12, n_test: int = 3, size: tuple[int, int] = (5, 4)):
    """IDX arrays by key, and each file as published: name -> gzip bytes and payload bytes."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
        "train_labels": np.arange(n_train, dtype=np.uint8) % 10,
        "test_images": rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
        "test_labels": (9 - np.arange(n_test, dtype=np.uint8)) % 10,
    }
    payloads = {name: idx_bytes(arrays[key]) for key, name in IDX_FILES.items()}
    archives = {name: gzip.compress(payload, mtime=0) for name, payload in payloads.items()}
    return arrays, archives, payloads


@pytest.fixture
def mirror(tmp_path):
    arrays, archives, payloads = generated_idx()
    folder = tmp_path / "mirror"
    folder.mkdir()
    for name, archive in archives.items():
        (folder / name).write_bytes(archive)
    checksums = {name: hashlib.sha256(payload).hexdigest() for name, payload in payloads.items()}
    return folder, arrays, checksums


def test_fetch_and_read_generated_idx(mirror, tmp_path):
    folder, arrays, checksums = mirror
    config = data_config("mnist", mirrors=[folder.as_uri()], cache_dir=str(tmp_path / "cache"))
    target = tmp_path / "raw"
    target.mkdir()
    files_fetcher({name: RemoteFile(name, payload_sha256=digest) for name, digest in checksums.items()})(
        config, target
    )
    dataset = idx_reader([str(d) for d in range(10)])(target)
    assert dataset.images.shape == (15, 1, 5, 4)
    assert np.array_equal(dataset.images[12:, 0], arrays["test_images"])
    assert np.array_equal(dataset.labels[:12], arrays["train_labels"])
    assert dataset.official_test.tolist() == [False] * 12 + [True] * 3
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(IDX_FILES.values())


def test_read_idx_refuses_a_truncated_or_foreign_file(tmp_path):
    good = idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8))
    (tmp_path / "short").write_bytes(good[:-1])
    (tmp_path / "text").write_bytes(b"<html>not idx</html>")
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match="not a uint8 IDX file"):
        read_idx(tmp_path / "text")


@pytest.fixture
def fashion(http_mirror, monkeypatch):
    """Generated Fashion-MNIST files on the HTTP mirror, with their archive digests published."""
    arrays, archives, _ = generated_idx(n_train=20, n_test=4, size=(28, 28))
    for name, archive in archives.items():
        http_mirror.files[name] = archive
        published = RemoteFile(
            name, sha256=hashlib.sha256(archive).hexdigest(), md5=hashlib.md5(archive).hexdigest()
        )
        monkeypatch.setitem(idx.FASHION_MNIST_FILES, name, published)
    return arrays


def test_fashion_mnist_over_http_keeps_names_labels_and_the_test_split(fashion, http_mirror, tmp_path):
    config = data_config(
        "fashion_mnist",
        mirrors=[http_mirror.mirror("flaky"), http_mirror.mirror()],
        cache_dir=str(tmp_path / "cache"),
    )
    source = get_source("fashion_mnist")
    (tmp_path / "raw").mkdir()
    source.fetch(config, tmp_path / "raw")
    dataset = source.read(config, tmp_path / "raw", tmp_path)
    assert dataset.images.shape == (24, 1, 28, 28)
    assert np.array_equal(dataset.images[:20, 0], fashion["train_images"])
    assert dataset.official_test.tolist() == [False] * 20 + [True] * 4
    assert dataset.classes[0] == "T-shirt/top" and dataset.classes[9] == "Ankle boot"
    assert [dataset.classes[i] for i in dataset.labels[20:]] == ["Ankle boot", "Bag", "Sneaker", "Shirt"]
    assert all(http_mirror.hits[f"/flaky/{name}"] == 2 for name in IDX_FILES.values())  # 503, retried


def test_fashion_mnist_refuses_a_file_that_does_not_match_its_published_digests(
    fashion, http_mirror, tmp_path
):
    name = IDX_FILES["train_labels"]
    http_mirror.files[name] = gzip.compress(b"\0\0\x08\x01\0\0\0\0", mtime=0)
    config = data_config("fashion_mnist", mirrors=[http_mirror.mirror()], cache_dir=str(tmp_path))
    (tmp_path / "raw").mkdir()
    with pytest.raises(DownloadError, match=f"could not fetch {name}.*checksum mismatch"):
        get_source("fashion_mnist").fetch(config, tmp_path / "raw")
