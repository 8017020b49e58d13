"""Registry versions downloaded once: a second `imgclf predict --model models:/<name>@<alias>` (or
`imgclf serve`) asks the registry only which version the alias names, and loads that version's
files from here when they are already on disk, intact.

The folder is $XDG_CACHE_HOME/imgclf/registry (default ~/.cache/imgclf/registry). Each entry is
one version of one model in one store, `<hash of the store's URI>/<model name>/<version>/`:
`files/` (the version's artifacts), `sidecar.json` (the export's model.json from the version's
run, when it has one) and `entry.json`, which says which version it is (source, run, creation
time: a model deleted and registered again starts over at version 1) and each file's SHA-256. An
entry is used only when all of that still holds; otherwise the version is downloaded again and
replaces it. Entries are made in a temporary folder beside them and renamed into place, so no
reader sees half of one. The newest KEEP entries of each model are kept.
"""

import hashlib
import json
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from imgclf.serving.registry_reader import VersionRecord

KEEP = 3  # versions kept per model: the one served, the one before, and one more
ENTRY = "entry.json"


class CacheUnwritable(Exception):
    """The cache folder cannot be written (a read-only home): the caller does without."""


def cache_folder() -> Path:
    """imgclf's cache folder for registry versions: $XDG_CACHE_HOME/imgclf/registry, else
    ~/.cache/imgclf/registry."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "imgclf" / "registry"


class VersionCache:
    def __init__(self, root: Path | None = None):
        self.root = root or cache_folder()

    def folder(self, store: str, record: VersionRecord) -> Path:
        store_key = hashlib.sha256(store.encode()).hexdigest()[:16]
        return self.root / store_key / _segment(record.name) / _segment(record.version)

    def lookup(self, store: str, record: VersionRecord) -> Path | None:
        """The entry of this very version, every file intact; None if there is none (or a stale,
        incomplete or corrupted one, which the next `add` replaces)."""
        folder = self.folder(store, record)
        try:
            entry = json.loads((folder / ENTRY).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("identity") != _identity(store, record):
            return None
        files = entry.get("files")
        if not isinstance(files, dict) or not files:
            return None
        for name, sha256 in files.items():
            try:
                if _sha256(folder / name) != sha256:
                    return None
            except OSError:
                return None
        return folder

    def add(self, store: str, record: VersionRecord, fill: Callable[[Path], None]) -> Path:
        """Download the version with `fill(folder)` into a new entry and return its folder;
        CacheUnwritable, before any download, if the cache folder cannot be written."""
        final = self.folder(store, record)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{record.version}.", dir=final.parent))
        except OSError as error:
            raise CacheUnwritable(f"{final.parent}: {error.strerror or error}") from None
        try:
            fill(work)
            files = {
                path.relative_to(work).as_posix(): _sha256(path)
                for path in sorted(work.rglob("*"))
                if path.is_file()
            }
            entry = {"identity": _identity(store, record), "files": files}
            (work / ENTRY).write_text(json.dumps(entry, indent=1) + "\n", encoding="utf-8")
            self._place(work, final, store, record)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # gone unless placed
        self._prune(final)
        return final

    def _place(self, work: Path, final: Path, store: str, record: VersionRecord) -> None:
        """Rename `work` to `final`; a stale entry there is moved aside first, a good one (another
        process was quicker) is kept."""
        for _ in range(3):
            try:
                os.rename(work, final)
                return
            except OSError:
                if self.lookup(store, record) is not None:
                    return
            stale = final.with_name(f".{final.name}.stale.{os.getpid()}")
            try:
                os.rename(final, stale)
            except OSError:
                continue  # another process moved it aside first
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(work, final)  # raises: the cache folder is contended beyond reason

    def _prune(self, keep: Path) -> None:
        """Keep the KEEP newest entries of this model (by download time), `keep` among them."""
        entries = []
        for folder in keep.parent.iterdir():
            try:
                entries.append((folder == keep, (folder / ENTRY).stat().st_mtime, folder))
            except OSError:
                continue
        for _, _, folder in sorted(entries, reverse=True)[KEEP:]:
            shutil.rmtree(folder, ignore_errors=True)


def _segment(name: str) -> str:
    """`name` as one folder name: no separator, no dot (no `..`, and never a temporary's `.`)."""
    return urllib.parse.quote(name, safe="").replace(".", "%2E")


def _identity(store: str, record: VersionRecord) -> dict:
    """What makes a version this version: the same number in a model registered again is another."""
    return {
        "store": store,
        "name": record.name,
        "version": record.version,
        "source": record.source,
        "run_id": record.run_id,
        "created": record.creation_timestamp,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
