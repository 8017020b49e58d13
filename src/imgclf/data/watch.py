"""Whether the data a download would fetch has changed since the last one: the download stage's
fast way out.

DVC cannot watch `data.path` or the `data.extra_train` folders, outside the repository, so the
download stage runs on every `dvc repro` (`always_changed`) and keeps its output (`persist`). It
then compares a fingerprint of what it would fetch (the `data` params, the stage's code deps in
dvc.yaml and, for a `data.path` folder, each `data.extra_train` folder or a file:// archive, each
file's path, size and modification time), and of its output as it is (names and sizes),
with the ones recorded at the last download, and stops at once when they agree: a no-op repro
stays fast, and a changed folder is picked up. An archive URL without `data.sha256` is always
fetched again: it may change behind the same URL.

That record stays on the machine that downloaded. An output that DVC put there (`dvc pull`,
`dvc checkout`) is current too when dvc.lock says a download from the same params and code made
it: DVC's own record, which travels with the commit.

Standard library and YAML only, so the check costs no more than starting Python.
"""

import hashlib
import json
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import yaml

NEVER = "never"  # a fingerprint no record equals: download again


def fingerprint(params_file: Path, stage: str = "download") -> str:
    """What a download from `params_file`'s `data` section, by the code dvc.yaml lists for the
    stage (beside params.yaml), would fetch, as a SHA-256."""
    root = params_file.parent
    data = (yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}).get("data") or {}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
    if not (root / "dvc.yaml").is_file():
        return NEVER  # run outside a DVC project: no record of the code to compare
    for path in code_deps(root, stage):
        digest.update(path.read_bytes())
    url, path, extra = data.get("url"), data.get("path"), data.get("extra_train") or []
    if isinstance(url, str):
        if not data.get("sha256"):
            return NEVER  # an unpinned archive may change behind the same URL
        if url.startswith("file://"):
            local = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
            if not local.is_file():
                return NEVER
            digest.update(stat_line(local, local.parent))
    folders = [Path(path).expanduser()] if isinstance(path, str) else []
    # Relative to the repository root, as imgclf.data.extra_train.resolve reads them.
    folders += [root / Path(folder).expanduser() for folder in extra if isinstance(folder, str)]
    for folder in folders:
        if not folder.is_dir():
            return NEVER  # the download reports the missing folder
        digest.update(f"{folder}\n".encode("utf-8", "surrogateescape"))
        for file in walk_files(folder):
            digest.update(stat_line(file, folder))
    return digest.hexdigest()


def code_deps(root: Path, stage: str) -> list[Path]:
    """The stage's code deps in dvc.yaml, folders expanded: editing any of them downloads again."""
    deps = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]["deps"]
    files: list[Path] = []
    for dep in deps:
        path = root / dep
        if dep.startswith(("src/", "pipelines/")):
            files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def stat_line(path: Path, root: Path) -> bytes:
    stat = path.stat()
    return f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode(
        "utf-8", "surrogateescape"
    )


def output_state(raw_dir: Path) -> str:
    """The download's output as it is now, by names and sizes: a file deleted, added or cut short
    there means download again. Not by times: DVC relinks the output from its cache."""
    digest = hashlib.sha256()
    for file in walk_files(raw_dir):
        digest.update(
            f"{file.relative_to(raw_dir).as_posix()}\0{file.stat().st_size}\n".encode(
                "utf-8", "surrogateescape"
            )
        )
    return digest.hexdigest()


def walk_files(root: Path) -> Iterator[Path]:
    """Every file below `root`, in a stable order."""
    for folder, dirs, files in os.walk(root, followlinks=True):  # as the image folder is read
        dirs.sort()
        yield from (Path(folder) / name for name in sorted(files))


def record_file(raw_dir: Path) -> Path:
    """Beside the output, not in it: the output's hash must depend on the data alone."""
    return raw_dir.with_name(f".{raw_dir.name}.source")


def is_current(raw_dir: Path, current: str) -> bool:
    if current == NEVER or not raw_dir.is_dir():
        return False
    recorded = record_file(raw_dir)
    if recorded.is_file() and recorded.read_text(encoding="utf-8") == f"{current} {output_state(raw_dir)}":
        return True
    if not made_as_locked(raw_dir):
        return False
    record(raw_dir, current)  # the next check takes the fast way
    return True


def made_as_locked(raw_dir: Path) -> bool:
    """Whether dvc.lock names `raw_dir`, as it is now, the output of a stage whose params and code
    deps are as they are now. Never for a `data.path` or `data.extra_train` folder: it is on one
    machine only."""
    out = raw_dir.resolve()
    root = next((folder for folder in out.parents if (folder / "dvc.yaml").is_file()), None)
    if root is None or not (root / "dvc.lock").is_file():
        return False
    relpath = out.relative_to(root).as_posix()
    locked = (yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8")) or {}).get("stages") or {}
    stage = next((s for s in locked.values() if relpath in [o["path"] for o in s.get("outs", [])]), None)
    if stage is None:
        return False
    for params_file, keys in (stage.get("params") or {}).items():
        now = yaml.safe_load((root / params_file).read_text(encoding="utf-8")) or {}
        data = now.get("data") or {}
        if isinstance(data.get("path"), str) or data.get("extra_train"):
            return False
        if any(lookup(now, key) != value for key, value in keys.items()):
            return False
    files = [(root / dep["path"], dep.get("md5")) for dep in stage.get("deps", [])]
    files += [(out, o.get("md5")) for o in stage["outs"] if o["path"] == relpath]
    return all(path.exists() and dvc_md5(path) == md5 for path, md5 in files)


def lookup(params: dict, key: str):
    for part in key.split("."):
        params = params.get(part) if isinstance(params, dict) else None
    return params


def dvc_md5(path: Path) -> str:
    """The hash dvc.lock gives a file or folder: a folder's is that of the sorted JSON list of its
    files' hashes (DVC's `.dir` object). __pycache__ is not code: left out, as .dvcignore should."""
    if path.is_file():
        return hashlib.md5(path.read_bytes()).hexdigest()
    entries = [
        {"md5": dvc_md5(file), "relpath": file.relative_to(path).as_posix()}
        for file in walk_files(path)
        if "__pycache__" not in file.relative_to(path).parts
    ]
    entries.sort(key=lambda entry: entry["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def record(raw_dir: Path, current: str) -> None:
    record_file(raw_dir).write_text(f"{current} {output_state(raw_dir)}", encoding="utf-8")
