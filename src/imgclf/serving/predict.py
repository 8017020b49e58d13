"""`imgclf predict`: classify image files and folders with an exported model.

Folders are walked (sorted, recursively, image suffixes only); a file that cannot be read or
decoded gets its own line and the others are still classified, in batches through one session.
`prediction` is also what the HTTP API answers for each upload, so both give the same record.
"""

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from imgclf.errors import ImgclfError
from imgclf.images import IMAGE_SUFFIXES, MAX_PIXELS, BadImage
from imgclf.serving.model import ServedModel

BATCH = 256


def prediction(file: str, probabilities: np.ndarray, classes: tuple[str, ...], top_k: int | None) -> dict:
    """One file's record: label, index, and probabilities by class (all, or the top k, best first)."""
    index = int(np.argmax(probabilities))
    if top_k is None:
        order = range(len(classes))
    else:
        order = np.argsort(-probabilities, kind="stable")[:top_k].tolist()
    values = probabilities.tolist()  # Python floats, as float() gives them, in one call
    return {
        "file": file,
        "label": classes[index],
        "index": index,
        "probabilities": {classes[i]: values[i] for i in order},
    }


def image_files(arguments: Iterable[str]) -> Iterator[tuple[str, Path | str]]:
    """(name, path) per file to classify, or (name, error) for an argument that gives none."""
    for argument in arguments:
        path = Path(argument)
        if not path.is_dir():
            yield argument, path  # named files are tried whatever their extension
            continue
        try:
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        except OSError as error:  # an unreadable subfolder: report this argument, go on with the rest
            yield argument, f"cannot walk this folder: {error.strerror or error}: {error.filename}"
            continue
        if not found:
            yield argument, f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder"
        for file in found:
            yield str(file), file


def predict_files(
    model: ServedModel, arguments: Iterable[str], top_k: int | None = None, batch: int = BATCH
) -> Iterator[dict]:
    """A record per file, in order: a prediction, or {"file", "error"}."""
    pending: list[tuple[str, np.ndarray | str]] = []
    decoded = 0
    for name, source in image_files(arguments):
        item = source if isinstance(source, str) else _decode(model, source)
        pending.append((name, item))
        decoded += not isinstance(item, str)
        if decoded == batch:
            yield from _classify(model, pending, top_k)
            pending, decoded = [], 0
    yield from _classify(model, pending, top_k)


def _decode(model: ServedModel, path: Path) -> np.ndarray | str:
    try:
        return model.preprocess(path)
    except BadImage as error:
        return str(error)
    except OSError as error:  # missing, unreadable, a folder's special file...
        return error.strerror or str(error)


def _classify(model: ServedModel, pending: list, top_k: int | None) -> Iterator[dict]:
    images = [item for _, item in pending if not isinstance(item, str)]
    probabilities = iter(model.predict(np.stack(images)) if images else [])
    for name, item in pending:
        if isinstance(item, str):
            yield {"file": name, "error": item}
        else:
            yield prediction(name, next(probabilities), model.card.classes, top_k)


def run(
    model_uri: str,
    files: list[str],
    as_json: bool,
    top_k: int | None,
    threads: int,
    max_pixels: int = MAX_PIXELS,
) -> None:
    """The command: print the records, then fail (exit 1) if any file could not be classified."""
    model = ServedModel.load(model_uri, threads=threads, max_pixels=max_pixels)
    records = predict_files(model, files, top_k)
    if as_json:
        failed = total = 0
        for record in records:
            print(json.dumps(record), flush=True)
            failed, total = failed + ("error" in record), total + 1
    else:
        table = list(records)
        print(format_table(table, top_k))
        failed, total = sum("error" in r for r in table), len(table)
    if failed:
        raise ImgclfError(f"{failed} of {total} files could not be classified")


def format_table(records: list[dict], top_k: int | None) -> str:
    """FILE LABEL PROBABILITY columns (and TOP-K with --top-k above 1), aligned plain text."""
    show_top = top_k is not None and top_k > 1
    header = ["FILE", "LABEL", "PROBABILITY"] + (["TOP-K"] if show_top else [])
    rows = []
    for record in records:
        if "error" in record:
            rows.append([record["file"], f"error: {record['error']}"])
            continue
        probabilities = record["probabilities"]
        row = [record["file"], record["label"], f"{probabilities[record['label']]:.4f}"]
        if show_top:
            row.append(", ".join(f"{label} {p:.4f}" for label, p in probabilities.items()))
        rows.append(row)
    # Error rows span the LABEL column onwards, so they do not widen it.
    widths = [max(len(r[i]) for r in [header, *rows] if len(r) > i + 1) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
