"""`data.extra_train`: labelled image folders (`FOLDER/<class>/<image>`) added to the training split.

The retraining loop's way back in: `imgclf serve --capture DIR` and the labelling page write
`DIR/labelled/<true label>/<sha256>.<ext>`, and `data.extra_train: [DIR/labelled]` trains on them.

download (`extra_folders`, `copy_extra_train`): each folder's image files are copied into
data/raw/<name>/.extra_train/<i>/<class>/..., i its place in the list. The raw output then holds
everything normalize reads, so its hash changes exactly when a folder's images do; the download
stage's fingerprint (imgclf.data.watch) covers the folders, which DVC cannot watch. Hidden, so
that the imagefolder source does not take it for a class.

normalize (`read_extra_train`): every image is decoded by imgclf.images.decode_image_with_info
to the data set's own input spec (mode, size, resize: the model card's), as the imagefolder source
and `imgclf serve` decode theirs, and appended after the data set's training images. The
validation and test splits never see them: they stay byte for byte what they were, so a retrained
model is compared with the champion on the same test set.
"""

import os
import shutil
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.card import InputSpec
from imgclf.config.pipeline import DataConfig
from imgclf.data.sources.catalog import RawDataset
from imgclf.data.sources.imagefolder import MAX_CHUNK, decoded, scan
from imgclf.errors import ConfigError, ImgclfError
from imgclf.images import MAX_PIXELS

EXTRA_DIR = ".extra_train"  # in data/raw/<name>/


def resolve(folder: str, root: Path) -> Path:
    """A `data.extra_train` entry as a path: `~` expanded, a relative one under the repository root."""
    return root / Path(folder).expanduser()  # an absolute right-hand side replaces root


def extra_folders(config: DataConfig, root: Path) -> list[Path]:
    """The `data.extra_train` folders; a missing one is a ConfigError naming it."""
    folders = [resolve(folder, root) for folder in config.extra_train]
    for i, folder in enumerate(folders):
        if not folder.is_dir():
            given = config.extra_train[i]
            raise ConfigError(f"data.extra_train[{i}]={given!r}: no such folder ({folder.absolute()})")
    return folders


def copy_extra_train(config: DataConfig, folders: list[Path], target: Path) -> None:
    """Copy each folder's image files into target/.extra_train/<i>/<class>/<path in the class folder>."""
    for i, folder in enumerate(folders):
        classes, ignored = scan(folder)
        for name, files in classes.items():
            for path in files:
                dest = target / EXTRA_DIR / str(i) / name / path.relative_to(folder / name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)  # a copy: DVC's cache is read-only, the folder is the user's
        counts = ", ".join(f"{name} {len(files)}" for name, files in classes.items() if files) or "no images"
        left_out = f"; left out {len(ignored)} files that are not images by name" if ignored else ""
        print(f"extra_train: {config.extra_train[i]}: {counts}{left_out}", file=sys.stderr)


@dataclass(frozen=True)
class ExtraTrain:
    """The extra training images, decoded; `counts` is {folder as written: {class: images}}."""

    images: np.ndarray  # uint8 (N, C, H, W), N may be 0
    labels: np.ndarray
    counts: dict[str, dict[str, int]]
    bad_files: tuple[dict[str, str], ...]
    sizes: np.ndarray  # int32 (N, 2): each image's (width, height) before resizing


def read_extra_train(config: DataConfig, raw: RawDataset, raw_dir: Path, scratch: Path) -> ExtraTrain:
    """Decode raw_dir/.extra_train/ to `raw`'s input spec, labelled by `raw`'s class names.

    A class folder that is not one of the data set's classes is a ConfigError naming it and the
    known classes: skipping it would silently drop images someone labelled.
    """
    spec = InputSpec.for_shape(raw.images.shape[1:], raw.resize)
    stale = sorted(
        entry.name
        for entry in (raw_dir / EXTRA_DIR).glob("*")
        if not (entry.name.isdigit() and int(entry.name) < len(config.extra_train))
    )
    if stale:
        raise ImgclfError(
            f"{raw_dir / EXTRA_DIR} holds folders {stale} that data.extra_train does not list: "
            "run the download stage (dvc repro) first"
        )
    index = {name: label for label, name in enumerate(raw.classes)}
    files, counts = [], {}
    for i, folder in enumerate(config.extra_train):
        copied = raw_dir / EXTRA_DIR / str(i)
        classes = scan(copied)[0] if copied.is_dir() else {}
        unknown = sorted(set(classes) - set(index))
        if unknown:
            raise ConfigError(
                f"data.extra_train[{i}]={folder!r}: class folder(s) {unknown} are not classes of "
                f"data {config.name!r}; its classes: {', '.join(raw.classes)}"
            )
        counts[folder] = {name: len(paths) for name, paths in classes.items() if paths}
        files += [(path, index[name], folder, copied) for name, paths in classes.items() for path in paths]
    if not files:
        empty = np.empty((0, *spec.shape), dtype=np.uint8)
        return ExtraTrain(empty, np.empty(0, dtype=np.int64), counts, (), np.empty((0, 2), dtype=np.int32))
    workers = getattr(config, "workers", 0) or os.cpu_count() or 1
    if len(files) <= MAX_CHUNK:
        workers = 1  # a few captured images: starting decode processes would cost more than it saves
    max_pixels = getattr(config, "max_image_pixels", MAX_PIXELS)
    labels, bad, sizes = [], [], []
    pixels_path = scratch / "extra_train.u8"
    results = decoded([path for path, *_ in files], spec, max_pixels, workers)
    with closing(results), pixels_path.open("wb") as out:
        for (path, label, folder, copied), result in zip(files, results, strict=True):
            if isinstance(result, str):
                # Named as the user knows it: their folder, not the copy in data/raw.
                bad.append({"path": f"{folder}/{path.relative_to(copied).as_posix()}", "reason": result})
                counts[folder][raw.classes[label]] -= 1
                continue
            out.write(result[0].data)
            labels.append(label)
            sizes.append((result[1].width, result[1].height))
    if bad and getattr(config, "on_bad_image", "skip") == "fail":
        shown = "; ".join(f"{b['path']}: {b['reason']}" for b in bad[:20])
        raise ImgclfError(f"{len(bad)} bad image(s) in data.extra_train (data.on_bad_image=fail): {shown}")
    counts = {folder: {name: n for name, n in per_class.items() if n} for folder, per_class in counts.items()}
    if labels:
        images = np.memmap(pixels_path, dtype=np.uint8, mode="r", shape=(len(labels), *spec.shape))
    else:
        images = np.empty((0, *spec.shape), dtype=np.uint8)
    sizes = np.array(sizes, dtype=np.int32).reshape(-1, 2)
    return ExtraTrain(images, np.array(labels, dtype=np.int64), counts, tuple(bad), sizes)
