"""Safe extraction: hostile archives are refused and leave the target as it was."""

import io
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from imgclf.data.archives import ArchiveError, extract_archive

MB = 1 << 20
CAP = 10 * MB


def make_zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] = {}) -> Path:  # noqa: B006
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in symlinks.items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix, so external_attr carries the file type
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def tar_special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def files_under(folder: Path) -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


@pytest.fixture
def target(tmp_path) -> Path:
    """A target that already holds an earlier extraction, which a failure must leave as it was."""
    folder = tmp_path / "out" / "extracted"
    folder.mkdir(parents=True)
    (folder / "earlier.txt").write_bytes(b"earlier")
    return folder


def assert_untouched(target: Path) -> None:
    assert files_under(target) == {"earlier.txt": b"earlier"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["extracted"]  # no temporary leftovers


GOOD = {"cats/a.png": b"cat a", "cats/deep/b.png": b"cat b", "dogs/c.png": b"dog c"}


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_good_archive_extracts_and_replaces_the_target(tmp_path, target, kind):
    archive = tmp_path / f"good.{kind}"
    if kind == "zip":
        make_zip(archive, GOOD)
    else:
        make_tar(archive, list(GOOD.items()))
    extract_archive(archive, target, CAP)
    assert files_under(target) == GOOD


TRAVERSALS = {
    "dot-dot": "../evil.png",
    "dot-dot-inside": "cats/../../evil.png",
    "absolute": "/tmp/evil.png",
    "backslash-dot-dot": "cats\\..\\..\\evil.png",
    "drive-letter": "C:/evil.png",
}


@pytest.mark.parametrize("name", TRAVERSALS.values(), ids=TRAVERSALS.keys())
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_path_traversal_is_refused(tmp_path, target, kind, name):
    archive = tmp_path / f"evil.{kind}"
    members = {"cats/a.png": b"fine", name: b"evil"}
    if kind == "zip":
        make_zip(archive, members)
    else:
        make_tar(archive, list(members.items()))
    with pytest.raises(ArchiveError, match=r"member .*evil\.png.*refused") as error:
        extract_archive(archive, target, CAP)
    assert "\n" not in str(error.value)
    assert_untouched(target)
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "out" / "evil.png").exists()


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (tar_special("cats/link.png", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link to '/etc/passwd'"),
        (tar_special("cats/inner.png", tarfile.SYMTYPE, "a.png"), "symbolic link"),
        (tar_special("cats/hard.png", tarfile.LNKTYPE, "cats/a.png"), "hard link"),
        (tar_special("cats/dev", tarfile.CHRTYPE), "device"),
        (tar_special("cats/fifo", tarfile.FIFOTYPE), "FIFO"),
    ],
    ids=["symlink-out", "symlink-in", "hardlink", "device", "fifo"],
)
def test_tar_links_and_special_files_are_refused(tmp_path, target, member, why):
    archive = make_tar(tmp_path / "links.tar.gz", [("cats/a.png", b"fine"), member])
    with pytest.raises(ArchiveError, match=why):
        extract_archive(archive, target, CAP)
    assert_untouched(target)


def test_zip_symlink_is_refused(tmp_path, target):
    archive = make_zip(tmp_path / "link.zip", {"cats/a.png": b"fine"}, {"cats/link.png": "/etc/passwd"})
    with pytest.raises(ArchiveError, match=r"'cats/link\.png' is a symbolic link"):
        extract_archive(archive, target, CAP)
    assert_untouched(target)


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory) -> Path:
    """200 MB of zeros, deflated to about 200 KB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("cats/a.png", b"fine")
        with zf.open("cats/zeros.png", "w") as f:
            for _ in range(200):
                f.write(bytes(MB))
    return path


def test_zip_bomb_is_refused_by_its_declared_size(zip_bomb, target):
    assert zip_bomb.stat().st_size < 2 * MB
    with pytest.raises(ArchiveError, match=rf"more than data\.max_archive_bytes={CAP} bytes"):
        extract_archive(zip_bomb, target, CAP)
    assert_untouched(target)


def test_zip_that_understates_its_sizes_is_refused(zip_bomb, tmp_path, target):
    """Headers rewritten to claim 1 KB get past the up-front size check, not past extraction."""
    data = bytearray(zip_bomb.read_bytes())
    with zipfile.ZipFile(zip_bomb) as zf:
        info = zf.getinfo("cats/zeros.png")
    # The local header (at header_offset) and the central directory entry both hold the size;
    # the member is the last one, so its central directory entry is the last "PK\1\2" record.
    struct.pack_into("<I", data, info.header_offset + 22, 1024)
    struct.pack_into("<I", data, data.rindex(b"PK\x01\x02") + 24, 1024)
    liar = tmp_path / "liar.zip"
    liar.write_bytes(bytes(data))
    with zipfile.ZipFile(liar) as zf:
        assert zf.getinfo("cats/zeros.png").file_size == 1024  # the lie is what a header check sees
    with pytest.raises(ArchiveError, match=r"'cats/zeros\.png' is corrupt"):
        extract_archive(liar, target, CAP)
    assert_untouched(target)


def test_tar_gz_bomb_is_stopped_at_the_cap(tmp_path, target):
    # No up-front check for tar (it would mean decompressing twice): the running count stops it.
    archive = make_tar(tmp_path / "bomb.tar.gz", [("cats/a.png", b"fine"), ("cats/zeros.png", bytes(3 * MB))])
    assert archive.stat().st_size < 100_000
    with pytest.raises(ArchiveError, match=r"more than data\.max_archive_bytes=1048576 bytes.*zeros\.png"):
        extract_archive(archive, target, MB)
    assert_untouched(target)


def test_duplicate_member_is_refused(tmp_path, target):
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("cats/a.png", b"first")
        zf.writestr("cats/a.png", b"second")
    with pytest.raises(ArchiveError, match=r"'cats/a\.png' clashes with an earlier member"):
        extract_archive(archive, target, CAP)
    assert_untouched(target)


@pytest.mark.parametrize("content", [b"not an archive at all", b"PK\x03\x04" + bytes(100)])
def test_not_an_archive_or_a_corrupt_one(tmp_path, target, content):
    archive = tmp_path / "broken.zip"
    archive.write_bytes(content)
    with pytest.raises(ArchiveError, match=r"^broken\.zip: "):
        extract_archive(archive, target, CAP)
    assert_untouched(target)


def test_truncated_tar_gz_is_refused(tmp_path, target):
    archive = make_tar(tmp_path / "cut.tar.gz", [("cats/a.png", bytes(range(256)) * 400)])
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(ArchiveError, match=r"^cut\.tar\.gz: .*corrupt"):
        extract_archive(archive, target, CAP)
    assert_untouched(target)


def test_a_bomb_of_empty_members_is_refused(tmp_path, target):
    # No bytes to count, but each member costs a file: a million of them is a bomb too.
    archive = make_tar(tmp_path / "files.tar.gz", [(f"cats/{i}.png", b"") for i in range(2000)])
    with pytest.raises(ArchiveError, match=r"more than data\.max_archive_bytes=1048576 bytes"):
        extract_archive(archive, target, MB)
    assert_untouched(target)


def test_a_name_that_is_not_utf8_is_refused(tmp_path, target):
    archive = tmp_path / "latin1.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        info = tarfile.TarInfo("cats/caf\xe9.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ArchiveError, match=r"not valid UTF-8"):
        extract_archive(archive, target, CAP)
    assert_untouched(target)
