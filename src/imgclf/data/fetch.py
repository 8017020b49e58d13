"""Robust downloads shared by every data source.

pooch (the usual choice for fetching data files) verifies one hash of one URL; it cannot resume
a cut transfer, fail over between mirrors, read file:// mirrors, or accept a mirror that
re-compressed the same payload. So this module does, with requests and tqdm:

- stream to `<cache>/<name>.part`, resume it with an HTTP Range request after an interruption;
- retry transient failures (connection cut, timeout, 5xx) with exponential backoff;
- reject an HTML page served in place of the file, and a body shorter than announced;
- verify before the rename into place: the published SHA-256 and/or MD5 of the file (some data
  sets publish only an MD5), or the SHA-256 of its gzip-decompressed payload;
- fail over to the next mirror; when all fail, one error that lists every mirror and why.

Verified files live in a cache (`data.cache_dir`), so a second pipeline never downloads again.
Progress is a tqdm bar (bytes, speed, ETA) on a terminal, and a plain line every 15 s otherwise.
"""

import contextlib
import gzip
import hashlib
import os
import re
import shutil
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from imgclf.config.pipeline import URL_SCHEMES
from imgclf.errors import ConfigError, ImgclfError

CHUNK = 1 << 16
PLAIN_PROGRESS_SECONDS = 15.0
HTML_STARTS = (b"<!doctype html", b"<html")
HEX_LENGTHS = {"sha256": 64, "md5": 32, "payload_sha256": 64}


class DownloadError(ImgclfError):
    """No mirror delivered a file that verifies."""


class TransientError(Exception):
    """Worth retrying on the same mirror (5xx, connection cut, timeout, short body)."""


@dataclass(frozen=True)
class RemoteFile:
    """A file published under the same name on every mirror, with what it must hash to."""

    name: str
    sha256: str | None = None  # of the file as published
    md5: str | None = None  # of the file as published, where that is all its authors publish
    payload_sha256: str | None = None  # of the decompressed payload, for gzip files

    def __post_init__(self):
        given = {key: getattr(self, key) for key in HEX_LENGTHS if getattr(self, key)}
        if not given:
            raise ValueError(f"{self.name}: a checksum is required")
        for key, value in given.items():
            digits = HEX_LENGTHS[key]
            if not re.fullmatch(f"[0-9a-f]{{{digits}}}", value):
                raise ValueError(f"{self.name}: {key}={value!r} is not {digits} lowercase hex digits")

    @property
    def file_digests(self) -> dict[str, str]:
        """The published digests of the file itself, by hashlib name."""
        return {key: value for key, value in (("sha256", self.sha256), ("md5", self.md5)) if value}


def digests_of(path: Path, algorithms: list[str]) -> dict[str, str]:
    """Several digests of a file in one read."""
    hashers = {name: hashlib.new(name, usedforsecurity=False) for name in algorithms}
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            for hasher in hashers.values():
                hasher.update(block)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def sha256_of(path: Path, decompress: bool = False) -> str:
    digest = hashlib.sha256()
    opener = gzip.open if decompress else open
    with opener(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verifies(path: Path, remote: RemoteFile) -> bool:
    """The file matches every published digest of the file, or its decompressed payload matches."""
    published = remote.file_digests
    if published and digests_of(path, list(published)) == published:
        return True
    if remote.payload_sha256:
        try:
            return sha256_of(path, decompress=True) == remote.payload_sha256
        except (OSError, EOFError, gzip.BadGzipFile):
            return False
    return False


def progress(total: int | None, desc: str, initial: int = 0, unit: str = "B"):
    """A progress bar on a terminal; plain, sparse lines otherwise, so CI logs stay readable.

    unit "B" counts bytes (shown in KiB, MiB...); any other unit counts items, e.g. "images".
    """
    if not sys.stderr.isatty():
        return ProgressLines(total, desc, initial, unit=unit)
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024,
        file=sys.stderr,
        mininterval=0.2,
        dynamic_ncols=True,
    )


class ProgressLines:
    """Progress as whole lines: when it starts, every `interval` seconds, when it ends.

    tqdm off a terminal writes carriage returns that logs keep as one ever-growing line.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        initial: int = 0,
        interval: float = PLAIN_PROGRESS_SECONDS,
        stream: TextIO | None = None,
        unit: str = "B",
    ):
        self.total, self.desc, self.initial, self.done = total, desc, initial, initial
        self.unit = unit
        self.interval, self.stream = interval, stream or sys.stderr
        self.started = self.last = time.monotonic()

    def __enter__(self) -> "ProgressLines":
        start = f"resuming at {self._amount(self.initial)} of" if self.initial else "downloading"
        if self.unit != "B":
            start = f"{self._amount(self.initial)} of" if self.initial else "starting on"
        self._print(f"{start} {self._amount(self.total) if self.total is not None else 'unknown size'}")
        return self

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            rate = self._rate(now)
            line = self._amount(self.done)
            if self.total:
                line += f" of {self._amount(self.total)} ({100 * self.done / self.total:.0f}%)"
            line += f", {self._amount(rate)}/s"
            if self.total and rate > 0:
                line += f", ETA {(self.total - self.done) / rate:.0f} s"
            self._print(line)

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            now = time.monotonic()
            elapsed, rate = now - self.started, self._amount(self._rate(now))
            self._print(f"{self._amount(self.done)} done in {elapsed:.1f} s ({rate}/s)")

    def _rate(self, now: float) -> float:
        return (self.done - self.initial) / max(now - self.started, 1e-6)

    def _amount(self, n: float) -> str:
        return _size(n) if self.unit == "B" else f"{n:,.0f} {self.unit}"

    def _print(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=self.stream, flush=True)


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def fetch(
    remote: RemoteFile,
    mirrors: list[str],
    cache_dir: Path,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = 30,
) -> Path:
    """The verified file in `cache_dir`, downloaded from the first mirror that delivers it."""
    for base in mirrors:  # a mistyped mirror is a bad value (exit 2), not a failed download
        scheme = urllib.parse.urlparse(base).scheme
        if scheme not in URL_SCHEMES:
            allowed = ", ".join(f"{name}://" for name in URL_SCHEMES)
            raise ConfigError(f"data.mirrors: {base!r}: scheme {scheme!r} is not supported; use {allowed}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # The cache is shared by every checkout and queued experiment: one downloader at a time, so a
    # second pipeline waits for the first's verified file instead of writing the same .part.
    with _locked(cache_dir):
        return _fetch_unlocked(remote, mirrors, cache_dir, retries, backoff, timeout)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` itself (flock on the directory: no lock file left behind)."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _fetch_unlocked(
    remote: RemoteFile, mirrors: list[str], cache_dir: Path, retries: int, backoff: float, timeout: float
) -> Path:
    target = cache_dir / remote.name
    if target.is_file() and verifies(target, remote):
        return target
    if not mirrors:
        raise ConfigError(
            f"data.mirrors=[]: no mirror to fetch {remote.name} from, and it is not in {cache_dir}"
        )
    part = target.with_name(target.name + ".part")
    errors = []
    for base in mirrors:
        url = urllib.parse.urljoin(base if base.endswith("/") else base + "/", remote.name)
        try:
            download_url(url, part, retries, backoff, timeout)
            if not verifies(part, remote):
                raise DownloadError("checksum mismatch")
            os.replace(part, target)
            return target
        except (DownloadError, TransientError, OSError) as error:
            errors.append(f"{url}: {error}")
            part.unlink(missing_ok=True)  # a bad or partial body must not be resumed elsewhere
            if len(errors) < len(mirrors):
                print(f"{remote.name}: {url} failed ({error}); trying the next mirror", file=sys.stderr)
    raise DownloadError(f"could not fetch {remote.name} from any mirror: " + "; ".join(errors))


def download_url(url: str, part: Path, retries: int = 3, backoff: float = 0.5, timeout: float = 30) -> None:
    """Stream `url` into `part`, resuming what is there and retrying transient errors.

    No verification: `fetch` checks the result; a caller without a checksum gets the bytes as sent.
    """
    for attempt in range(retries + 1):
        try:
            _download(url, part, timeout)
            return
        except TransientError:
            if attempt == retries:
                raise
            time.sleep(backoff * 2**attempt)


def _download(url: str, part: Path, timeout: float) -> None:
    scheme = urllib.parse.urlparse(url).scheme
    if scheme == "file":
        source = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
        if not source.is_file():
            raise DownloadError("no such file")
        shutil.copyfile(source, part)
    elif scheme in ("http", "https"):
        _download_http(url, part, timeout)
    else:
        raise DownloadError(f"unsupported scheme {scheme!r} (use https://, http:// or file://)")


def _download_http(url: str, part: Path, timeout: float) -> None:
    import requests

    have = part.stat().st_size if part.exists() else 0
    # identity: byte offsets for Range must be those of the file, not of a compressed stream
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={have}-"} if have else {})
    try:
        response = requests.get(url, headers=headers, stream=True, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as error:
        raise TransientError(f"connection failed: {type(error).__name__}") from None
    with response:
        if response.status_code == 416 and have:  # the part is already complete
            return
        if response.status_code >= 500 or response.status_code == 429:
            raise TransientError(f"HTTP {response.status_code}")
        if response.status_code not in (200, 206):
            raise DownloadError(f"HTTP {response.status_code}")
        if "text/html" in response.headers.get("Content-Type", ""):
            raise DownloadError("the server sent an HTML page, not the file")
        resumed = response.status_code == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            part.unlink(missing_ok=True)  # not the bytes after ours: start over on the retry
            raise TransientError(f"resumed at the wrong offset: {response.headers.get('Content-Range')!r}")
        start = have if resumed else 0
        length = response.headers.get("Content-Length")
        expected = start + int(length) if length is not None else None
        written = start
        with part.open("ab" if resumed else "wb") as f, progress(expected, part.stem, start) as bar:
            try:
                for block in response.iter_content(CHUNK):
                    if written == 0 and block.lstrip()[:14].lower().startswith(HTML_STARTS):
                        raise DownloadError("the server sent an HTML page, not the file")
                    f.write(block)
                    written += len(block)
                    bar.update(len(block))
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as error:
                raise TransientError(
                    f"connection cut after {written} bytes ({type(error).__name__})"
                ) from None
    if expected is not None and written != expected:
        raise TransientError(f"got {written} of {expected} bytes")
