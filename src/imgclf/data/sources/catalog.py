"""The catalog of data sources: a name in `data.name` -> how to fetch it and how to read it back.

A source's `fetch` writes the data, as downloaded or materialised, into an empty folder; its
`read` turns that folder into canonical arrays for the normalize stage. Each family module of
this package calls `register` once per source; this module imports none of them.
"""

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from imgclf.config.pipeline import DataConfig
from imgclf.data.fetch import RemoteFile, fetch


@dataclass(frozen=True)
class RawDataset:
    """A source's images as uint8 (N, C, H, W) in 0..255, integer labels and class names.

    `official_test`, when set, is a boolean mask of the images the source publishes as its test
    split; without one the normalize stage draws a seeded, stratified test split.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    official_test: np.ndarray | None = None
    source: dict | None = None  # what the source files were (modes, sizes); None: as the arrays are
    bad_files: tuple[dict[str, str], ...] = ()  # files left out: {"path", "reason"}
    # How an image of another size is fitted to these arrays when served. Published sets come at
    # their own size, so "stretch"; the imagefolder reader sets it from `data.resize`.
    resize: Literal["stretch", "crop"] = "stretch"
    # Each image's (width, height) as its file was (N, 2), before resizing; None: the arrays' own.
    sizes: np.ndarray | None = None

    def source_sizes(self, idx: np.ndarray) -> np.ndarray:
        """(width, height) before resizing of the images at idx, (len(idx), 2) int32."""
        if self.sizes is not None:
            return np.asarray(self.sizes, dtype=np.int32)[idx]
        height, width = self.images.shape[-2:]
        return np.tile(np.array([width, height], dtype=np.int32), (len(idx), 1))


Fetcher = Callable[[DataConfig, Path], None]  # (config, empty target folder)
Reader = Callable[[DataConfig, Path, Path], RawDataset]  # (config, raw folder, scratch folder)


@dataclass(frozen=True)
class DataSource:
    name: str
    fetch: Fetcher
    read: Reader


SOURCES: dict[str, DataSource] = {}


def register(name: str, fetch: Fetcher, read: Reader) -> DataSource:
    """Make `name` a source: `fetch` writes its raw data, `read` loads what it wrote."""
    if name in SOURCES:
        raise ValueError(f"data source {name!r} is registered twice")
    SOURCES[name] = source = DataSource(name, fetch, read)
    return source


def get_source(name: str) -> DataSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown data source {name!r}; known: {', '.join(sorted(SOURCES))}") from None


def from_files(read: Callable[[Path], RawDataset]) -> Reader:
    """A reader for a published data set: its files say everything, so no config or scratch."""
    return lambda config, raw_dir, scratch: read(raw_dir)


def files_fetcher(files: dict[str, RemoteFile]) -> Fetcher:
    """Fetch every file of `files` (looked up at call time) through the cache into the target."""

    def fetch_files(config: DataConfig, target: Path) -> None:
        cache = Path(config.cache_dir).expanduser() / config.name
        for name, remote in files.items():
            shutil.copyfile(fetch(remote, config.mirrors, cache), target / name)

    return fetch_files


def source_summary(modes: dict[str, int], widths: np.ndarray, heights: np.ndarray) -> dict:
    """What a source's images were, for report.json: counts per mode, spread of sizes."""

    def spread(values: np.ndarray) -> dict[str, float]:
        return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}

    return {"images": len(widths), "modes": modes, "width": spread(widths), "height": spread(heights)}
