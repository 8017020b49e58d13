"""The `imagefolder` source: the user's own images, one subfolder per class (`data=imagefolder`).

download (`fetch_imagefolder`): `data.path`, a local folder, is copied; `data.url`, a .zip or .tar
archive, is downloaded (through the cache when `data.sha256` pins it) and extracted safely
(imgclf.data.archives). Either way data/raw/imagefolder/<class>/... holds the image files as they
were, under their own names: raw data stays raw, and decoding choices (size, mode) belong to the
normalize stage. DVC still re-runs download when any `data.*` key changes (a stage can only
declare keys that every data set has); unchanged files hash the same, so nothing after it re-runs
for that, and only an archive without `data.sha256` (not cached) is downloaded again.

normalize (`decode_folder`): every file goes through imgclf.images.decode_image, the function
predict and serve use, in a pool of processes; the pixels are appended to a flat file that the
normalize stage reads back as a memmap, so memory stays at a few chunks whatever the image count.
"""

import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from itertools import islice
from pathlib import Path

import numpy as np

from imgclf.card import InputSpec
from imgclf.config.pipeline import ImageFolderData
from imgclf.data.archives import extract_archive, printable_name
from imgclf.data.fetch import (
    DownloadError,
    RemoteFile,
    TransientError,
    download_url,
    fetch,
    progress,
    sha256_of,
)
from imgclf.data.sources.catalog import RawDataset, register, source_summary
from imgclf.errors import ConfigError, ImgclfError
from imgclf.images import IMAGE_SUFFIXES, BadImage, SourceInfo, decode_image_with_info

# Litter that archivers and file browsers leave; hidden names (".DS_Store", "._a.jpg") too.
LITTER = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
MAX_CHUNK = 256  # files per task sent to a decode process: enough to amortise the round trip


def read_imagefolder(config: ImageFolderData, raw_dir: Path, scratch: Path) -> RawDataset:
    """The folder's pixels depend on data.image_size, data.mode and data.resize: decode them."""
    return decode_folder(config, raw_dir, scratch)


def fetch_imagefolder(config: ImageFolderData, target: Path) -> None:
    """Copy `data.path`, or download and extract `data.url`, into target/<class>/...

    The schema has checked that exactly one is set, and that the URL names an archive.
    """
    if config.path is not None:
        root = Path(config.path).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.path={config.path!r}: no such folder")
        take_images(root, target, move=False)
        return
    # Scratch beside the target: same file system, so extracted files move into place by rename.
    with tempfile.TemporaryDirectory(prefix=".imagefolder-", dir=target.parent) as scratch:
        archive = download_archive(config, Path(scratch))
        extracted = extract_archive(archive, Path(scratch) / "extracted", config.max_archive_bytes)
        take_images(dataset_root(extracted), target, move=True)


register("imagefolder", fetch=fetch_imagefolder, read=read_imagefolder)


def download_archive(config: ImageFolderData, scratch: Path) -> Path:
    """The archive at `data.url`: verified and cached if `data.sha256` is set, else fetched afresh."""
    base, _, name = config.url.rpartition("/")
    if config.sha256:
        cache = Path(config.cache_dir).expanduser() / "imagefolder"
        return fetch(RemoteFile(name, sha256=config.sha256), [base + "/"], cache)
    # Nothing to verify a cached copy against, so no cache: download with fetch's resume and
    # retries, then print the digest so the user can pin it.
    part = scratch / name
    try:
        download_url(config.url, part)
    except (DownloadError, TransientError, OSError) as error:
        raise DownloadError(f"could not fetch data.url={config.url!r}: {error}") from None
    print(
        f"imagefolder: {name} has SHA-256 {sha256_of(part)}; set data.sha256 to verify and cache it",
        file=sys.stderr,
    )
    return part


def dataset_root(folder: Path) -> Path:
    """The folder that holds the class folders: archives often wrap them in one top folder.

    A folder whose only subfolder itself has subfolders is such a wrapper (loose files beside it,
    a README say, do not count): one class alone is never a data set.
    """
    while True:
        folders = [entry for entry in folder.iterdir() if entry.is_dir() and visible(entry.name)]
        if len(folders) != 1 or not any(c.is_dir() and visible(c.name) for c in folders[0].iterdir()):
            return folder
        folder = folders[0]


def visible(name: str) -> bool:
    return not name.startswith(".") and name not in LITTER


def scan(root: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """Image files per class folder (class names and files sorted), and the files left out."""
    classes, ignored = {}, []
    for entry in sorted(root.iterdir()):
        if not visible(entry.name):
            continue
        if not entry.is_dir():
            ignored.append(entry)
            continue
        if not printable_name(entry.name):  # a class name goes in the model card
            raise ImgclfError(f"{str(entry)!r}: the name is not valid UTF-8 or holds a line break")
        files = []
        for folder, dirs, names in os.walk(entry):  # symlinked folders are not followed: no loops
            dirs[:] = [d for d in dirs if visible(d)]
            for name in names:
                if visible(name):
                    path = Path(folder, name)
                    if not printable_name(path.name):
                        raise ImgclfError(f"{str(path)!r}: the name is not valid UTF-8 or holds a line break")
                    (files if path.suffix.lower() in IMAGE_SUFFIXES else ignored).append(path)
        classes[entry.name] = sorted(files)
    return classes, sorted(ignored)


def take_images(root: Path, target: Path, move: bool) -> None:
    """Copy (or move) root's image files into target/<class>/<path in the class folder>."""
    classes, ignored = scan(root)
    if len(classes) < 2:
        raise ImgclfError(
            f"{root}: {len(classes)} class folder(s) {sorted(classes)}; "
            "need at least 2 subfolders, one per class, holding the images"
        )
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise ImgclfError(
            f"{root}: class folder(s) {empty} hold no image files (by suffix: {', '.join(IMAGE_SUFFIXES)})"
        )
    for name, files in classes.items():
        for path in files:
            dest = target / name / path.relative_to(root / name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            # A copy, not a hard link: DVC makes its cache read-only, and a link would share that
            # with the user's own files.
            if move:
                os.replace(path, dest)
            else:
                shutil.copyfile(path, dest)
    counts = ", ".join(f"{name} {len(files)}" for name, files in classes.items())
    print(f"imagefolder: {len(classes)} classes ({counts})", file=sys.stderr)
    if ignored:
        shown = ", ".join(str(path.relative_to(root)) for path in ignored[:3])
        print(
            f"imagefolder: left out {len(ignored)} files that are not images by name: {shown}",
            file=sys.stderr,
        )


MAX_BAD_SHOWN = 20  # bad files named in the error of on_bad_image=fail


def decode_folder(config: ImageFolderData, raw_dir: Path, scratch: Path) -> RawDataset:
    """Decode data/raw/imagefolder/ per the config into scratch/pixels.u8, a chunk at a time.

    The images are a read-only memmap of that file; `source` and `bad_files` say what the files
    were and which were left out, for the report.
    """
    classes, _ = scan(raw_dir)
    files = [(path, label) for label, paths in enumerate(classes.values()) for path in paths]
    spec = InputSpec(config.mode, tuple(config.image_size), config.resize)
    workers = config.workers or os.cpu_count() or 1
    labels, bad, modes, sizes = [], [], Counter(), []
    pixels_path = scratch / "pixels.u8"
    results = decoded([path for path, _ in files], spec, config.max_image_pixels, workers)
    with (
        closing(results),
        pixels_path.open("wb") as out,
        progress(len(files), "decode", unit="images") as bar,
    ):
        for (path, label), result in zip(files, results, strict=True):
            bar.update(1)
            if isinstance(result, str):
                bad.append({"path": path.relative_to(raw_dir).as_posix(), "reason": result})
                continue
            pixels, info = result
            out.write(pixels.data)
            labels.append(label)
            modes[info.mode] += 1
            sizes.append((info.width, info.height))
    if bad and config.on_bad_image == "fail":
        # Every bad file in one message: the stage writes nothing, so there is no report to read.
        shown = "; ".join(f"{b['path']}: {b['reason']}" for b in bad[:MAX_BAD_SHOWN])
        more = f"; and {len(bad) - MAX_BAD_SHOWN} more" if len(bad) > MAX_BAD_SHOWN else ""
        raise ImgclfError(
            f"{len(bad)} bad image(s) in {raw_dir} (data.on_bad_image=fail; set it to skip to leave "
            f"them out): {shown}{more}"
        )
    if not labels:
        raise ImgclfError(f"none of the {len(files)} files in {raw_dir} could be decoded")
    images = np.memmap(pixels_path, dtype=np.uint8, mode="r", shape=(len(labels), *spec.shape))
    widths, heights = np.array(sizes).T
    source = source_summary(dict(sorted(modes.items())), widths, heights) | {"files": len(files)}
    return RawDataset(
        images,
        np.array(labels, dtype=np.int64),
        list(classes),
        source=source,
        bad_files=tuple(bad),
        resize=config.resize,
        sizes=np.array(sizes, dtype=np.int32),
    )


def decoded(
    paths: list[Path], spec: InputSpec, max_pixels: int, workers: int
) -> Iterator[tuple[np.ndarray, SourceInfo] | str]:
    """For each path in order: its pixels and source info, or why it is a bad image.

    Chunks of files go to `workers` processes, at most two chunks per process in flight, so
    results waiting to be written stay a few MB. One worker decodes here, without a pool.
    """
    size = max(1, min(MAX_CHUNK, math.ceil(len(paths) / (4 * workers))))
    chunks = (paths[start : start + size] for start in range(0, len(paths), size))
    if workers == 1:
        for chunk in chunks:
            yield from decode_chunk(chunk, spec, max_pixels)
        return
    # spawn, not fork: the parent may hold threads (tqdm's monitor, torch's pools in tests) whose
    # locks a forked child would inherit mid-use.
    context = multiprocessing.get_context("spawn")
    workers = min(workers, math.ceil(len(paths) / size))
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        try:
            pending = deque(
                pool.submit(decode_chunk, chunk, spec, max_pixels) for chunk in islice(chunks, 2 * workers)
            )
            while pending:
                done = pending.popleft().result()
                for chunk in islice(chunks, 1):  # the next chunk, if any, takes the freed place
                    pending.append(pool.submit(decode_chunk, chunk, spec, max_pixels))
                yield from done
        finally:
            pool.shutdown(cancel_futures=True)  # a failed or abandoned run stops queued work


def decode_chunk(
    paths: list[Path], spec: InputSpec, max_pixels: int
) -> list[tuple[np.ndarray, SourceInfo] | str]:
    """Runs in a decode process: a bad image becomes its reason, anything else raises."""
    results = []
    for path in paths:
        try:
            results.append(decode_image_with_info(path, spec, max_pixels))
        except BadImage as error:
            results.append(str(error))
    return results
