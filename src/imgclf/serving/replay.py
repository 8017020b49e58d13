"""`imgclf drift`: replay image files against a model's drift reference, window by window.

PATHs are image files, folders (walked as `imgclf predict` walks them) or capture manifests
(`*.jsonl`, as `imgclf serve --capture` writes: each line an object whose "path" or "file" names
an image, relative to the manifest's folder). The images are classified in batches, cut into
windows of N in the order given, and each window is tested as `imgclf serve` tests its windows
(imgclf.drift.monitor); a last partial window is tested when it holds at least half a window.
Files that are not images are skipped and counted.

Exit status: 0 no window alarmed, 1 some window did, 2 a usage error (a missing path, no images,
a model without a reference).
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.drift.monitor import ALPHA, SignalResult, WindowTest, concatenate, take
from imgclf.drift.reference import SIGNALS, Reference, ReferenceError, image_signals, read_reference
from imgclf.errors import ImgclfError
from imgclf.images import BadImage, SourceInfo
from imgclf.serving.model import ServedModel
from imgclf.serving.predict import BATCH, image_files


class DriftUsageError(ImgclfError):
    exit_code = 2


@dataclass(frozen=True)
class Replayed:
    windows: list[dict]  # {"window", "images", "signals": {name: SignalResult}, "alarm"}
    images: int
    skipped: list[tuple[str, str]]  # (file, why)
    untested: int  # images after the last window tested
    signal_alpha: float
    signals: tuple[str, ...]  # the signals the reference tests, in SIGNALS' order


def model_reference(model: ServedModel) -> Reference:
    try:
        reference = read_reference(model.session.get_modelmeta().custom_metadata_map)
    except ReferenceError as error:
        raise DriftUsageError(f"model {model.source!r}: {error}") from None
    if reference is None:
        raise DriftUsageError(
            f"model {model.source!r} has no drift reference (exported before imgclf computed one): "
            "re-export it with the pipeline's export stage"
        )
    return reference


def input_files(paths: list[str]) -> list[str | tuple[str, str]]:
    """The image files PATHs name, in order; (argument, why) for one that names none."""
    files: list[str | tuple[str, str]] = []
    for argument in paths:
        path = Path(argument)
        if not path.exists():
            raise DriftUsageError(f"{argument!r}: no such file or folder")
        if path.is_file() and path.suffix.lower() == ".jsonl":
            files += manifest_files(path)
            continue
        for name, found in image_files([argument]):
            files.append(str(found) if isinstance(found, Path) else (name, found))
    return files


def manifest_files(manifest: Path) -> list[str]:
    """The image files a capture manifest names, in its order."""
    files = []
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DriftUsageError(f"manifest {str(manifest)!r}: unreadable: {error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DriftUsageError(f"manifest {str(manifest)!r} line {number}: not JSON") from None
        name = record.get("path") or record.get("file") if isinstance(record, dict) else None
        if not isinstance(name, str):
            raise DriftUsageError(f'manifest {str(manifest)!r} line {number}: no "path" or "file" field')
        files.append(str(manifest.parent / name))
    return files


def replay(model: ServedModel, paths: list[str], window: int, alpha: float = ALPHA) -> Replayed:
    reference = model_reference(model)
    test = WindowTest(reference, window, alpha)
    parts, skipped, batch = [], [], []  # batch: (pixels, source info) of decoded files
    for entry in input_files(paths):
        if isinstance(entry, tuple):
            skipped.append(entry)
            continue
        try:
            batch.append(model.decode(entry))
        except (BadImage, OSError) as error:
            skipped.append((entry, str(error)))
            continue
        if len(batch) == BATCH:
            parts.append(_signals(model, batch))
            batch = []
    if batch:
        parts.append(_signals(model, batch))
    if not parts:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DriftUsageError(f"no images to replay in {' '.join(paths)}{first}")
    values = concatenate(parts)
    n = len(values["class"])
    if n < window / 2:
        raise DriftUsageError(f"{n} images, fewer than half a window of {window}: pass a smaller --window")
    windows, start = [], 0
    while n - start >= window / 2:
        stop = min(start + window, n)
        results = test.test(take(values, start, stop))
        windows.append(
            {
                "window": len(windows) + 1,
                "images": stop - start,
                "signals": results,
                "alarm": any(r.alarm for r in results.values()),
            }
        )
        start = stop
    return Replayed(windows, n, skipped, n - start, test.signal_alpha, test.signals)


def _signals(model: ServedModel, decoded: list[tuple[np.ndarray, SourceInfo]]) -> dict[str, np.ndarray]:
    batch = np.stack([pixels for pixels, _ in decoded])
    sizes = np.array([(source.width, source.height) for _, source in decoded])
    return image_signals(batch, model.predict(batch), sizes)


def table(replayed: Replayed) -> str:
    header = ["window", "images", *(f"p({name})" for name in replayed.signals), "alarm"]
    rows = [header]
    for w in replayed.windows:
        alarmed = [name for name, r in w["signals"].items() if r.alarm]
        cells = [str(w["window"]), str(w["images"])]
        cells += [_p_value(w["signals"].get(name)) for name in replayed.signals]
        rows.append([*cells, ", ".join(alarmed) or "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _p_value(result: SignalResult | None) -> str:
    return "-" if result is None else f"{result.p_value:.3g}"  # None: no image came with its size


def plot(replayed: Replayed, path: Path, title: str) -> None:
    """p-values per signal over the windows, on a log scale, with the alarm threshold."""
    from imgclf.fileio import atomic_path
    from imgclf.tracking.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(figsize=(8, 4))
    x = [w["window"] for w in replayed.windows]
    floor = 1e-20  # smaller p-values are drawn at the floor: the alarm is what matters
    for name in replayed.signals:
        p_values = [w["signals"][name].p_value if name in w["signals"] else np.nan for w in replayed.windows]
        axes.plot(x, np.maximum(p_values, floor), marker="o", label=name)
    threshold = replayed.signal_alpha
    axes.axhline(threshold, color="red", linestyle="--", label=f"alarm below {threshold:.2g}")
    axes.set(xlabel="window", ylabel="p-value (floored at 1e-20)", yscale="log", title=title)
    axes.set_ylim(floor / 3, 3)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run(model_uri: str, paths: list[str], window: int, plot_path: str) -> int:
    """`imgclf drift`: print the table, write the plot; the exit status (0 no drift, 1 drift)."""
    model = ServedModel.load(model_uri, threads=0)
    replayed = replay(model, paths, window)
    print(table(replayed))
    alarmed = [w for w in replayed.windows if w["alarm"]]
    signals = sorted(
        {name for w in alarmed for name, r in w["signals"].items() if r.alarm}, key=SIGNALS.index
    )
    skipped = ""
    if replayed.skipped:
        name, why = replayed.skipped[0]
        skipped = f"; skipped {len(replayed.skipped)} files that are not images (first: {name}: {why})"
    untested = (
        f"; the last {replayed.untested} images, under half a window, untested" if replayed.untested else ""
    )
    print(
        f"{replayed.images} images, {len(replayed.windows)} windows of {window}: "
        + (f"drift in {len(alarmed)} windows ({', '.join(signals)})" if alarmed else "no drift")
        + f" (alarm: p < {replayed.signal_alpha:.2g} per signal, 1 % per window in all){skipped}{untested}"
    )
    plot(replayed, Path(plot_path), f"{model.name} {model.version}: drift, windows of {window}")
    print(f"plot: {Path(plot_path).resolve()}")
    sys.stdout.flush()
    return 1 if alarmed else 0
