"""Safe extraction of downloaded archives (.zip, .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz).

An archive from a URL is untrusted input. `extract_archive` writes plain files and folders only,
each inside the target:

- members with an absolute path, a drive letter or a `..` component are refused (path traversal);
- symbolic and hard links, devices and FIFOs are refused: image data needs none, and a link is the
  classic way out of the target;
- the bytes actually written are counted against a cap, so a zip bomb stops at the cap whatever its
  headers claim; a zip's declared sizes are also checked up front, to fail before writing anything;
- the target is replaced only once everything is extracted (fileio.atomic_dir): a refused or
  corrupt archive leaves it as it was.

Extraction is by hand rather than `tarfile`'s `filter="data"` or `ZipFile.extractall`: those
cannot count bytes as they are written, and zipfile has no filter at all.
"""

import lzma
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from imgclf.errors import ImgclfError
from imgclf.fileio import atomic_dir

CHUNK = 1 << 20
# What a damaged archive raises while being read; a failure to write is not the archive's fault.
READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


class ArchiveError(ImgclfError):
    """An archive that is refused (unsafe) or unreadable; the message names the member."""


def extract_archive(archive: Path, target: Path, max_bytes: int) -> Path:
    """Extract `archive` into `target` (replaced only on success); at most `max_bytes` written."""
    budget = _Budget(archive.name, max_bytes)
    with atomic_dir(target) as tmp:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp, budget)
        elif _is_tar(archive):
            _extract_tar(archive, tmp, budget)
        else:
            raise ArchiveError(f"{archive.name}: not a zip or tar archive")
    return target


# What one member costs beyond its bytes: millions of empty members are a bomb of files, not bytes.
MEMBER_COST = 4096


class _Budget:
    """The bytes an archive may still expand to."""

    def __init__(self, archive: str, max_bytes: int):
        self.archive, self.max_bytes, self.used = archive, max_bytes, 0

    def spend(self, n: int, member: str) -> None:
        self.used += n
        if self.used > self.max_bytes:
            raise ArchiveError(
                f"{self.archive}: expands to more than data.max_archive_bytes={self.max_bytes} bytes "
                f"(reached at member {member!r}); refused as a possible zip bomb"
            )


def printable_name(name: str) -> bool:
    """Whether a file name can go in the SHA256SUMS manifest: valid UTF-8, one line."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes surface as lone surrogates
        return False
    return "\n" not in name and "\r" not in name


def member_path(root: Path, name: str, archive: str) -> Path:
    """Where member `name` goes under `root`; ArchiveError if it would land anywhere else."""

    def refuse(why: str) -> ArchiveError:
        return ArchiveError(f"{archive}: member {name!r} {why}; refused")

    if "\0" in name:
        raise refuse("has a NUL byte in its name")
    if not printable_name(name):
        raise refuse("has a name that is not valid UTF-8 or holds a line break")
    posix = name.replace("\\", "/")  # zips written on Windows may separate with backslashes
    if posix.startswith("/") or PureWindowsPath(name).drive:
        raise refuse("has an absolute path")
    parts = [part for part in PurePosixPath(posix).parts if part != "."]
    if ".." in parts:
        raise refuse("has a '..' component (path traversal)")
    if not parts:
        raise refuse("has an empty name")
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):  # belt and braces: nothing may escape
        raise refuse("resolves outside the target")
    return path


CLASHES = (FileExistsError, NotADirectoryError, IsADirectoryError)


def _mkdir(dest: Path, name: str, budget: _Budget) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except CLASHES:
        raise ArchiveError(f"{budget.archive}: member {name!r} clashes with an earlier member") from None


def _copy(source: BinaryIO, dest: Path, name: str, budget: _Budget) -> None:
    _mkdir(dest.parent, name, budget)
    try:
        out = dest.open("xb")  # "x": a second member with the same name must not overwrite the first
    except CLASHES:
        raise ArchiveError(f"{budget.archive}: member {name!r} clashes with an earlier member") from None
    with out:
        while True:
            try:
                block = source.read(CHUNK)
            except READ_ERRORS as error:
                raise ArchiveError(f"{budget.archive}: member {name!r} is corrupt: {error}") from None
            if not block:
                return
            budget.spend(len(block), name)
            out.write(block)


def _extract_zip(archive: Path, root: Path, budget: _Budget) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except READ_ERRORS as error:
        raise ArchiveError(f"{archive.name}: corrupt zip archive: {error}") from None
    with zf:
        members = zf.infolist()
        declared = sum(info.file_size for info in members) + MEMBER_COST * len(members)
        if declared > budget.max_bytes:
            budget.spend(declared, members[-1].filename)  # raises: fail before writing anything
        for info in members:
            dest = member_path(root, info.filename, archive.name)
            budget.spend(MEMBER_COST, info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)  # Unix file type, 0 from other systems
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                what = "is a symbolic link" if kind == stat.S_IFLNK else "is not a regular file"
                raise ArchiveError(f"{archive.name}: member {info.filename!r} {what}; refused")
            if info.is_dir():
                _mkdir(dest, info.filename, budget)
                continue
            try:
                source = zf.open(info)
            except (RuntimeError, NotImplementedError, *READ_ERRORS) as error:  # encrypted, unknown method
                raise ArchiveError(f"{archive.name}: cannot read member {info.filename!r}: {error}") from None
            with source:
                _copy(source, dest, info.filename, budget)


def _is_tar(archive: Path) -> bool:
    try:
        return tarfile.is_tarfile(archive)
    except READ_ERRORS:
        return False


def _extract_tar(archive: Path, root: Path, budget: _Budget) -> None:
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 (closed by the `with tar` below)
    except READ_ERRORS as error:
        raise ArchiveError(f"{archive.name}: corrupt tar archive: {error}") from None
    with tar:
        members = iter(tar)  # reads the (possibly compressed) stream once, front to back
        while True:
            try:
                member = next(members, None)
            except READ_ERRORS as error:
                raise ArchiveError(f"{archive.name}: corrupt tar archive: {error}") from None
            if member is None:
                return
            dest = member_path(root, member.name, archive.name)
            budget.spend(MEMBER_COST, member.name)
            if member.isdir():
                _mkdir(dest, member.name, budget)
            elif member.isreg():
                with tar.extractfile(member) as source:
                    _copy(source, dest, member.name, budget)
            else:
                raise ArchiveError(f"{archive.name}: member {member.name!r} is {_tar_kind(member)}; refused")


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"a hard link to {member.linkname!r}"
    if member.isdev():
        return "a device or FIFO"
    return f"of unsupported type {member.type!r}"
