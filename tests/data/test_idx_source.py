"""The IDX sources (MNIST and kin) on generated IDX files, fetched from a file:// mirror."""

import gzip
import hashlib

import numpy as np
import pytest

from imgclf.config import DataConfig
from imgclf.data.sources import IDX_FILES, idx_fetcher, idx_reader, read_idx


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def mirror(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (12, 5, 4), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, 12, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (3, 5, 4), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, 3, dtype=np.uint8),
    }
    folder = tmp_path / "mirror"
    folder.mkdir()
    checksums = {}
    for key, name in IDX_FILES.items():
        payload = idx_bytes(arrays[key])
        (folder / name).write_bytes(gzip.compress(payload))
        checksums[name] = hashlib.sha256(payload).hexdigest()
    return folder, arrays, checksums


def test_fetch_and_read_generated_idx(mirror, tmp_path):
    folder, arrays, checksums = mirror
    config = DataConfig(name="mnist", mirrors=[folder.as_uri()], cache_dir=str(tmp_path / "cache"))
    target = tmp_path / "raw"
    target.mkdir()
    idx_fetcher(checksums)(config, target)
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
