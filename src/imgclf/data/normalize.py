"""The normalize stage: split a raw data set, write canonical uint8 arrays, the model card and checks.

What it writes, data/normalized/, is described (and read back) in imgclf.data.normalized.

Images stream through in chunks: each split is gathered, hashed, measured and written into its
preallocated .npy a chunk at a time, so memory stays flat however large the data set. A published
source's `read` gives arrays in memory; an image folder is decoded into a file first
(imgclf.data.sources.imagefolder.decode_folder, the source's reader) and read back through a memmap.

Images from `data.extra_train` folders (imgclf.data.extra_train) are appended to the training
split after the split is drawn: the validation and test splits do not depend on them.
"""

import hashlib
import math
import tempfile
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path

import numpy as np

from imgclf.card import InputSpec, ModelCard, Normalization
from imgclf.config.pipeline import DataConfig
from imgclf.data.extra_train import ExtraTrain, read_extra_train
from imgclf.data.normalized import CARD, REPORT, SIZES, SPLITS
from imgclf.data.sources import RawDataset, get_source, source_summary
from imgclf.errors import ImgclfError
from imgclf.fileio import atomic_dir, save_array, write_json

CHUNK_BYTES = 8 << 20  # pixels in memory at once: 680 images of 64x64 RGB, 53 of 224x224


def normalize(config: DataConfig, seed: int, raw_dir: Path, out_dir: Path) -> dict[str, object]:
    """Read raw_dir with the configured source and write out_dir atomically; return the report."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Scratch beside the output: decoded pixels are as large as the output, so not in /tmp.
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.scratch.", dir=out_dir.parent) as scratch:
        raw, source, bad_files = load_source(config, raw_dir, Path(scratch))
        indices = split_indices(raw, config, seed)
        extra = read_extra_train(config, raw, raw_dir, Path(scratch))
        class_counts = {split: count_classes(raw, idx) for split, idx in indices.items()}
        class_counts["train"] = add_counts(class_counts["train"], extra.counts.values())
        check_class_counts(class_counts, config.min_class_count)
        with atomic_dir(out_dir) as tmp:
            stats = ChannelStats()
            written = {
                split: write_split(raw, idx, tmp / split, stats, extra)
                if split == "train"
                else write_split(raw, idx, tmp / split)
                for split, idx in indices.items()
            }
            pairs = combinations(SPLITS, 2)
            leaks = {f"{a}-{b}": len(written[a].hashes & written[b].hashes) for a, b in pairs}
            report = {
                "n_images": {split: len(idx) for split, idx in indices.items()}
                | {"train": len(indices["train"]) + len(extra.labels)},
                "class_counts": class_counts,
                "shape": list(raw.images.shape[1:]),
                "value_range": {split: [w.low, w.high] for split, w in written.items()},
                "duplicates_across_splits": leaks,
                "min_class_count": config.min_class_count,
                "source": source,
                "bad_files": bad_files + list(extra.bad_files),
            }
            if config.extra_train:  # absent without: the same data, the same report, no retraining
                report["extra_train"] = extra.counts  # {folder as written: {class: images added}}
            card = ModelCard(
                tuple(raw.classes),
                InputSpec.for_shape(raw.images.shape[1:], raw.resize),
                Normalization(**stats.result()),
            )
            write_json(tmp / CARD, card.to_json())
            write_json(tmp / REPORT, report)
    return report


def load_source(config: DataConfig, raw_dir: Path, scratch: Path) -> tuple[RawDataset, dict, list[dict]]:
    """The raw data set, what its images were (modes and sizes) and the files that were bad."""
    raw = get_source(config.name).read(config, raw_dir, scratch)
    if raw.source is not None:
        return raw, raw.source, list(raw.bad_files)
    n, _, height, width = raw.images.shape
    mode = InputSpec.for_shape(raw.images.shape[1:], raw.resize).mode
    return raw, source_summary({mode: n}, np.full(n, width), np.full(n, height)), []


def split_indices(raw: RawDataset, config: DataConfig, seed: int) -> dict[str, np.ndarray]:
    """Seeded, stratified train/val/test indices; a source's official test split is kept as is."""
    rng = np.random.default_rng(seed)
    everything = np.arange(len(raw.labels))
    if raw.official_test is not None:
        test, rest = everything[raw.official_test], everything[~raw.official_test]
        val_share, needed = config.val_fraction, 2
    else:
        rest = everything
        val_share, needed = config.val_fraction / (1 - config.test_fraction), 3
    totals = np.bincount(raw.labels[rest], minlength=len(raw.classes))
    short = [c for c in np.argsort(totals, kind="stable") if 0 < totals[c] < needed]
    if short:
        fewest = ", ".join(f"{raw.classes[c]!r} {totals[c]}" for c in short[:3])
        raise ImgclfError(
            f"cannot split {len(raw.labels)} images into train/val/test by class: every class needs "
            f"at least {needed} images (one per split); fewest: {fewest}"
        )
    if raw.official_test is None:
        rest, test = stratified_split(raw.labels, everything, config.test_fraction, rng)
    train, val = stratified_split(raw.labels, rest, val_share, rng)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def stratified_split(
    labels: np.ndarray, indices: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`indices` in two: the second part holds ceil(fraction x n) of them, drawn at random from
    each class in proportion to its size (the largest remainders get the rounding)."""
    classes, counts = np.unique(labels[indices], return_counts=True)
    n_part = math.ceil(fraction * len(indices))
    ideal = counts * n_part / len(indices)
    taken = np.floor(ideal).astype(int)
    taken[np.argsort(taken - ideal, kind="stable")[: n_part - taken.sum()]] += 1
    part = np.concatenate(
        [rng.permutation(indices[labels[indices] == c])[:k] for c, k in zip(classes, taken, strict=True)]
    )
    return np.setdiff1d(indices, part), part


def add_counts(counts: dict[str, int], more) -> dict[str, int]:
    """`counts` plus each {class: n} of `more`."""
    total = dict(counts)
    for per_class in more:
        for name, n in per_class.items():
            total[name] += n
    return total


def count_classes(raw: RawDataset, idx: np.ndarray) -> dict[str, int]:
    counts = np.bincount(raw.labels[idx], minlength=len(raw.classes)).tolist()
    return dict(zip(raw.classes, counts, strict=True))


def check_class_counts(counts: dict[str, dict[str, int]], minimum: int) -> None:
    """ImgclfError naming every class with fewer than `minimum` images in some split."""
    classes = next(iter(counts.values()))
    short = [c for c in classes if any(counts[split][c] < minimum for split in counts)]
    if not short:
        return
    described = [f"{c!r} ({', '.join(f'{s} {counts[s][c]}' for s in counts)})" for c in short[:5]]
    more = f" and {len(short) - 5} more" if len(short) > 5 else ""
    raise ImgclfError(
        f"{len(short)} class(es) have fewer than data.min_class_count={minimum} images in a split: "
        f"{'; '.join(described)}{more}; add images to them or lower data.min_class_count"
    )


class ChannelStats:
    """Per-channel mean and std over chunks of uint8 (N, C, H, W), in exact integer sums."""

    def __init__(self):
        self.count, self.sums, self.squares = 0, None, None

    def update(self, images: np.ndarray) -> None:
        n, channels, height, width = images.shape
        if self.sums is None:
            self.sums, self.squares = [0] * channels, [0] * channels
        self.count += n * height * width
        for c in range(channels):
            plane = images[:, c]
            self.sums[c] += int(plane.sum(dtype=np.uint64))
            squared = plane.astype(np.uint16)  # 255² fits: 2 bytes a pixel, not float64's 8
            squared *= squared
            self.squares[c] += int(squared.sum(dtype=np.uint64))

    def result(self) -> dict[str, list[float]]:
        n = self.count
        mean = [s / n for s in self.sums]
        # Variance from exact integers: no float cancellation however many pixels there are.
        std = [math.sqrt((q * n - s * s) / (n * n)) for s, q in zip(self.sums, self.squares, strict=True)]
        return {"mean": [round(m, 6) for m in mean], "std": [round(s, 6) for s in std]}


def image_hashes(images: np.ndarray) -> list[str]:
    return [hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() for image in images]


class WrittenSplit:
    """What writing a split learned on the way: pixel hashes and value range."""

    def __init__(self):
        self.hashes: set[str] = set()
        self.low, self.high = 255, 0

    def update(self, images: np.ndarray) -> None:
        self.hashes.update(image_hashes(images))
        self.low, self.high = min(self.low, int(images.min())), max(self.high, int(images.max()))


def write_split(
    raw: RawDataset,
    idx: np.ndarray,
    folder: Path,
    stats: ChannelStats | None = None,
    extra: ExtraTrain | None = None,
) -> WrittenSplit:
    """raw's images, labels and source sizes at `idx`, then `extra`'s, into folder/images.npy,
    labels.npy and sizes.npy, a chunk at a time; `stats` sees every image written."""
    folder.mkdir()
    path = folder / "images.npy"
    parts = [(raw.images, idx)]
    labels = raw.labels[idx].astype(np.int64)
    sizes = raw.source_sizes(idx)
    if extra is not None and len(extra.labels):
        parts.append((extra.images, np.arange(len(extra.labels))))
        labels = np.concatenate([labels, extra.labels])
        sizes = np.concatenate([sizes, extra.sizes])
    # open_memmap writes the .npy header and sizes the file; rows then go in by plain writes, as
    # pages written through a mapping stay in this process's RSS until it is unmapped.
    shape = (len(labels), *raw.images.shape[1:])
    header = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    offset = header.offset
    del header
    written = WrittenSplit()
    with path.open("r+b") as f:
        f.seek(offset)
        for images, rows_idx in parts:
            for rows in gather(images, rows_idx):
                f.write(rows.data)
                written.update(rows)
                if stats is not None:
                    stats.update(rows)
    save_array(folder / "labels.npy", labels)
    save_array(folder / SIZES, sizes)
    return written


def chunk_length(images: np.ndarray) -> int:
    """Images per chunk: CHUNK_BYTES of pixels, at least one image."""
    return max(1, CHUNK_BYTES // (images.itemsize * math.prod(images.shape[1:])))


def gather(images: np.ndarray, idx: np.ndarray) -> Iterator[np.ndarray]:
    """images[idx] as C-contiguous uint8 chunks of about CHUNK_BYTES.

    A memmap (as decode_folder returns: the whole file) is mapped afresh for each chunk and let go
    after it, so only one chunk's pages are ever resident in this process.
    """
    step = chunk_length(images)
    for start in range(0, len(idx), step):
        source = images
        if isinstance(images, np.memmap):
            source = np.memmap(images.filename, images.dtype, "r", images.offset, images.shape)
        yield np.ascontiguousarray(source[idx[start : start + step]], dtype=np.uint8)
        del source
