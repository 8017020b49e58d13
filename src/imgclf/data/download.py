"""The download stage: materialise a source into data/raw/<name>/ with a SHA-256 manifest."""

from pathlib import Path

from imgclf.config.pipeline import DataConfig
from imgclf.data.extra_train import copy_extra_train, extra_folders
from imgclf.data.fetch import sha256_of
from imgclf.data.sources import get_source
from imgclf.fileio import atomic_dir

MANIFEST = "SHA256SUMS"


def write_manifest(folder: Path) -> dict[str, str]:
    """Write `sha256sum`-compatible SHA256SUMS for every file in `folder`; return the hashes."""
    hashes = {
        path.relative_to(folder).as_posix(): sha256_of(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    lines = "".join(f"{digest}  {name}\n" for name, digest in hashes.items())
    (folder / MANIFEST).write_text(lines, encoding="utf-8")
    return hashes


def download(config: DataConfig, target: Path, root: Path = Path()) -> Path:
    """Fetch `config.name`, and copy the `data.extra_train` folders (relative ones under `root`,
    the repository root), into `target`, replacing it only once complete and hashed."""
    source = get_source(config.name)
    extra = extra_folders(config, root)  # a missing folder fails before a long download
    with atomic_dir(target) as tmp:
        source.fetch(config, tmp)
        copy_extra_train(config, extra, tmp)
        write_manifest(tmp)
    return target
