"""Whether the data a download would fetch has changed since the last one: the download stage's
fast way out.

DVC cannot watch `data.path`, a folder outside the repository, so the download stage runs on
every `dvc repro` (`always_changed`) and keeps its output (`persist`). It then compares a
fingerprint of what it would fetch (the `data` params and, for a local folder, each file's path,
size and modification time) with the one recorded at the last download, and stops at once when
they agree: a no-op repro stays a fraction of a second, and a changed folder is picked up.

Standard library and YAML only, so the check costs no more than starting Python.
"""

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import yaml


def fingerprint(params_file: Path) -> str:
    """What a download from `params_file`'s `data` section would fetch, as a SHA-256."""
    data = (yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}).get("data") or {}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
    if isinstance(data.get("path"), str):
        root = Path(data["path"]).expanduser()
        if not root.is_dir():
            return "missing"  # never current: the download reports the folder
        for path in walk_files(root):
            stat = path.stat()
            entry = f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
            digest.update(entry.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def walk_files(root: Path) -> Iterator[Path]:
    """Every file below `root`, in a stable order."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        yield from (Path(folder) / name for name in sorted(files))


def record_file(raw_dir: Path) -> Path:
    """Beside the output, not in it: the output's hash must depend on the data alone."""
    return raw_dir.with_name(f".{raw_dir.name}.source")


def is_current(raw_dir: Path, current: str) -> bool:
    record = record_file(raw_dir)
    return raw_dir.is_dir() and record.is_file() and record.read_text(encoding="utf-8") == current


def record(raw_dir: Path, current: str) -> None:
    record_file(raw_dir).write_text(current, encoding="utf-8")
