"""Data tests: what the normalize stage hands to training is shaped, balanced and leak-free."""

import hashlib
import json

import numpy as np
import pytest

from imgclf.config.compose import compose
from imgclf.config.operations import validate
from imgclf.data.download import MANIFEST
from imgclf.data.normalize import image_hashes, split_indices
from imgclf.data.normalized import SPLITS, load_card, load_split
from imgclf.data.sources import get_source
from tests.conftest import REPO


def test_raw_manifest_matches_the_files(digits_dirs):
    raw, _ = digits_dirs
    lines = (raw / MANIFEST).read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        digest, name = line.split("  ")
        assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == digest


def test_splits_are_canonical_uint8_nchw(digits_dirs):
    _, normalized = digits_dirs
    sizes = {}
    for split in SPLITS:
        images, labels = load_split(normalized, split)
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (1, 8, 8)
        assert labels.dtype == np.int64 and len(labels) == len(images)
        assert images.max() == 255 and images.min() == 0
        sizes[split] = len(labels)
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == pytest.approx(1797 * 0.15, abs=2)


def test_splits_are_stratified(digits_dirs):
    _, normalized = digits_dirs
    for split in SPLITS:
        _, labels = load_split(normalized, split)
        counts = np.bincount(labels, minlength=10)
        assert counts.max() - counts.min() <= 6, (split, counts)


def test_no_image_is_in_two_splits_and_the_report_says_so(digits_dirs):
    _, normalized = digits_dirs
    hashes = {split: set(image_hashes(load_split(normalized, split)[0])) for split in SPLITS}
    report = json.loads((normalized / "report.json").read_text())
    assert report["duplicates_across_splits"]["train-test"] == len(hashes["train"] & hashes["test"])
    assert report["duplicates_across_splits"]["train-val"] == len(hashes["train"] & hashes["val"])
    assert report["class_counts"]["train"]["3"] == int((load_split(normalized, "train")[1] == 3).sum())


def test_stats_are_those_of_the_train_split(digits_dirs):
    _, normalized = digits_dirs
    card = load_card(normalized)
    train, _ = load_split(normalized, "train")
    assert card.classes == tuple(str(d) for d in range(10))
    # Published sets come at their size: an upload of another size is stretched to 8x8.
    assert (card.input.mode, card.input.size, card.input.resize) == ("L", (8, 8), "stretch")
    assert card.normalization.mean[0] == pytest.approx(train.mean(), rel=1e-6)
    assert card.normalization.std[0] == pytest.approx(train.std(), rel=1e-6)


def test_split_depends_on_the_seed_only(digits_dirs):
    raw, _ = digits_dirs
    config = validate(compose([], REPO / "conf"))
    dataset = get_source("digits").read(config.data, raw, raw)
    first = split_indices(dataset, config.data, seed=1)
    again = split_indices(dataset, config.data, seed=1)
    other = split_indices(dataset, config.data, seed=2)
    assert all(np.array_equal(first[s], again[s]) for s in SPLITS)
    assert not np.array_equal(first["test"], other["test"])
    everything = np.concatenate([first[s] for s in SPLITS])
    assert np.array_equal(np.sort(everything), np.arange(1797))


def test_the_digits_file_is_what_scikit_learn_loads(tmp_path):
    """fetch reads scikit-learn's CSV without importing scikit-learn: the same images and labels."""
    from sklearn.datasets import load_digits

    from imgclf.data.sources.digits import fetch_digits

    config = validate(compose([], REPO / "conf"))
    fetch_digits(config.data, tmp_path)
    digits = load_digits()
    assert np.array_equal(np.load(tmp_path / "images.npy"), digits.images.astype(np.uint8))
    assert np.array_equal(np.load(tmp_path / "labels.npy"), digits.target)


def test_each_class_is_split_in_proportion(digits_dirs):
    raw, _ = digits_dirs
    config = validate(compose([], REPO / "conf"))
    dataset = get_source("digits").read(config.data, raw, raw)
    splits = split_indices(dataset, config.data, seed=42)
    totals = np.bincount(dataset.labels)
    for split, share in (("test", config.data.test_fraction), ("val", config.data.val_fraction)):
        counts = np.bincount(dataset.labels[splits[split]], minlength=10)
        assert np.all(np.abs(counts - totals * share) <= 1.5), (split, counts, totals * share)
