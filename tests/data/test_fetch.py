"""Downloads against a real HTTP server on 127.0.0.1 that misbehaves on purpose (conftest.py)."""

import gzip
import hashlib
import random

import pytest

from imgclf.data.fetch import DownloadError, RemoteFile, fetch

PAYLOAD = random.Random(0).randbytes(1 << 20)  # incompressible: the archive is 1 MiB too
ARCHIVE = gzip.compress(PAYLOAD, mtime=0)
RECOMPRESSED = gzip.compress(PAYLOAD, compresslevel=1, mtime=12345)
SHA = hashlib.sha256(ARCHIVE).hexdigest()
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def server(http_mirror):
    http_mirror.files.update({"data.gz": ARCHIVE, "recompressed/data.gz": RECOMPRESSED})
    return http_mirror


REMOTE = RemoteFile("data.gz", sha256=SHA, payload_sha256=PAYLOAD_SHA)


def fetch_from(server, cache, *modes, **kwargs):
    return fetch(REMOTE, [server.mirror(mode) for mode in modes], cache, backoff=0.01, **kwargs)


def test_plain_download_verifies_and_is_cached(server, tmp_path):
    path = fetch_from(server, tmp_path, "ok")
    assert path.read_bytes() == ARCHIVE
    assert fetch_from(server, tmp_path, "missing") == path  # the cache answers, no mirror asked
    assert list(tmp_path.iterdir()) == [path]


def test_503_is_retried(server, tmp_path):
    assert fetch_from(server, tmp_path, "flaky").read_bytes() == ARCHIVE
    assert server.hits["/flaky/data.gz"] == 2


def test_cut_connection_resumes_with_a_range_request(server, tmp_path):
    assert fetch_from(server, tmp_path, "cut").read_bytes() == ARCHIVE
    # Whole chunks received before the cut are kept; only the rest is asked for again.
    (asked,) = server.ranges
    assert 0 < int(asked.removeprefix("bytes=").rstrip("-")) <= len(ARCHIVE) // 2


def test_corrupt_file_fails_over_to_the_next_mirror(server, tmp_path):
    assert fetch_from(server, tmp_path, "corrupt", "ok").read_bytes() == ARCHIVE


def test_html_page_with_status_200_is_rejected(server, tmp_path):
    with pytest.raises(DownloadError, match="HTML page"):
        fetch_from(server, tmp_path, "html")


def test_recompressed_mirror_verifies_by_payload(server, tmp_path):
    assert fetch_from(server, tmp_path, "recompressed").read_bytes() == RECOMPRESSED


def test_slow_mirror_times_out_and_the_next_one_serves(server, tmp_path):
    path = fetch_from(server, tmp_path, "slow", "ok", timeout=0.5, retries=0)
    assert path.read_bytes() == ARCHIVE


def test_file_mirror(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "data.gz").write_bytes(RECOMPRESSED)
    path = fetch(REMOTE, [mirror.as_uri()], tmp_path / "cache")
    assert path.read_bytes() == RECOMPRESSED


def test_all_mirrors_failing_lists_each_and_leaves_nothing(server, tmp_path):
    with pytest.raises(DownloadError) as error:
        fetch_from(server, tmp_path, "missing", "corrupt", "html", retries=1)
    message = str(error.value)
    assert "\n" not in message
    for fragment in ("/missing/data.gz: HTTP 404", "/corrupt/data.gz: checksum mismatch", "/html/"):
        assert fragment in message
    assert list(tmp_path.iterdir()) == []
