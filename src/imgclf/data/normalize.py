"""The normalize stage: split a raw data set, write canonical uint8 arrays, statistics and checks.

Layout of data/normalized/:
    <split>/images.npy   uint8 (N, C, H, W), split in train, val, test
    <split>/labels.npy   int64 (N,)
    stats.json           per-channel mean and std of the train split, in pixel units (0..255)
    classes.json         class names, index = label
    report.json          data checks: counts per split and class, value range, cross-split duplicates
"""

import hashlib
from itertools import combinations
from pathlib import Path

import numpy as np

from imgclf.config import DataConfig
from imgclf.data.sources import RawDataset, get_source
from imgclf.fileio import atomic_dir, read_json, save_array, write_json

SPLITS = ("train", "val", "test")


def split_indices(raw: RawDataset, config: DataConfig, seed: int) -> dict[str, np.ndarray]:
    """Seeded, stratified train/val/test indices; a source's official test split is kept as is."""
    from sklearn.model_selection import train_test_split  # 1.5 s to import: only where needed

    everything = np.arange(len(raw.labels))
    if raw.official_test is not None:
        test = everything[raw.official_test]
        rest = everything[~raw.official_test]
        val_share = config.val_fraction
    else:
        rest, test = train_test_split(
            everything, test_size=config.test_fraction, stratify=raw.labels, random_state=seed
        )
        val_share = config.val_fraction / (1 - config.test_fraction)
    train, val = train_test_split(rest, test_size=val_share, stratify=raw.labels[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def channel_stats(images: np.ndarray) -> dict[str, list[float]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images, in pixel units."""
    pixels = images.astype(np.float64)
    mean = pixels.mean(axis=(0, 2, 3))
    std = pixels.std(axis=(0, 2, 3))
    return {"mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std]}


def image_hashes(images: np.ndarray) -> list[str]:
    return [hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() for image in images]


def data_report(splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str]) -> dict[str, object]:
    """Checks a user should see before training: balance, value range and leakage."""
    hashes = {name: set(image_hashes(images)) for name, (images, _) in splits.items()}
    leaks = {f"{a}-{b}": len(hashes[a] & hashes[b]) for a, b in combinations(splits, 2)}
    return {
        "n_images": {name: len(labels) for name, (_, labels) in splits.items()},
        "class_counts": {
            name: {classes[c]: int(n) for c, n in enumerate(np.bincount(labels, minlength=len(classes)))}
            for name, (_, labels) in splits.items()
        },
        "shape": list(next(iter(splits.values()))[0].shape[1:]),
        "value_range": {name: [int(images.min()), int(images.max())] for name, (images, _) in splits.items()},
        "duplicates_across_splits": leaks,
    }


def normalize(config: DataConfig, seed: int, raw_dir: Path, out_dir: Path) -> dict[str, object]:
    """Read raw_dir with the configured source and write out_dir atomically; return the report."""
    raw = get_source(config.name).read(raw_dir)
    indices = split_indices(raw, config, seed)
    splits = {name: (raw.images[idx], raw.labels[idx]) for name, idx in indices.items()}
    report = data_report(splits, raw.classes)
    with atomic_dir(out_dir) as tmp:
        for name, (images, labels) in splits.items():
            save_array(tmp / name / "images.npy", np.ascontiguousarray(images, dtype=np.uint8))
            save_array(tmp / name / "labels.npy", labels.astype(np.int64))
        write_json(tmp / "stats.json", channel_stats(splits["train"][0]))
        write_json(tmp / "classes.json", raw.classes)
        write_json(tmp / "report.json", report)
    return report


def load_split(data_dir: Path, split: str, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split of data/normalized/."""
    mode = "r" if mmap else None
    images = np.load(data_dir / split / "images.npy", mmap_mode=mode, allow_pickle=False)
    labels = np.load(data_dir / split / "labels.npy", allow_pickle=False)
    return images, labels


def load_metadata(data_dir: Path) -> tuple[list[str], dict[str, list[float]]]:
    """Class names and normalisation statistics of data/normalized/."""
    return read_json(data_dir / "classes.json"), read_json(data_dir / "stats.json")
