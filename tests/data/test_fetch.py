"""Downloads against a real HTTP server on 127.0.0.1 that misbehaves on purpose (conftest.py)."""

import gzip
import hashlib
import io
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from imgclf.data.fetch import DownloadError, ProgressLines, RemoteFile, fetch

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


def test_a_resume_at_the_wrong_offset_starts_over(server, tmp_path):
    assert fetch_from(server, tmp_path, "badrange").read_bytes() == ARCHIVE
    assert server.hits["/badrange/data.gz"] == 3  # cut, a 206 from byte 0 refused, then whole


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


def test_html_page_served_as_a_binary_is_rejected(server, tmp_path):
    server.files["data.gz"] = b"\n<!DOCTYPE html><html><body>Log in to download</body></html>"
    with pytest.raises(DownloadError, match="HTML page"):
        fetch_from(server, tmp_path, "ok", retries=0)


def test_md5_only_file_verifies_and_a_wrong_md5_does_not(server, tmp_path):
    md5 = hashlib.md5(ARCHIVE).hexdigest()
    assert fetch(RemoteFile("data.gz", md5=md5), [server.mirror()], tmp_path / "a").read_bytes() == ARCHIVE
    wrong = RemoteFile("data.gz", md5="0" * 32)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(wrong, [server.mirror()], tmp_path / "b")


def test_every_published_file_digest_must_match(server, tmp_path):
    remote = RemoteFile("data.gz", sha256=SHA, md5="0" * 32)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(remote, [server.mirror()], tmp_path)


@pytest.mark.parametrize(
    ("field", "value"), [("sha256", "abc"), ("md5", SHA), ("payload_sha256", PAYLOAD_SHA.upper())]
)
def test_malformed_checksums_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        RemoteFile("data.gz", **{field: value})


def test_progress_off_a_terminal_is_plain_lines(server, tmp_path, capsys):
    fetch_from(server, tmp_path, "corrupt", "ok")
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)
    failover = "/corrupt/data.gz failed (checksum mismatch); trying the next mirror"
    assert any(line.endswith(failover) for line in lines)
    assert lines[-2:] == ["data.gz: downloading 1.0 MiB", lines[-1]]
    assert lines[-1].startswith("data.gz: 1.0 MiB done in ")


def test_progress_lines_report_share_speed_and_eta():
    stream = io.StringIO()
    with ProgressLines(4096, "x.gz", interval=0, stream=stream) as bar:
        bar.update(1024)
    first, middle, last = stream.getvalue().splitlines()
    assert first == "x.gz: downloading 4.0 KiB"
    assert middle.startswith("x.gz: 1.0 KiB of 4.0 KiB (25%), ") and "/s, ETA " in middle
    assert last.startswith("x.gz: 1.0 KiB done in ")


def test_two_pipelines_sharing_a_cache_download_once(server, tmp_path):
    # Queued experiments share data.cache_dir: the second waits for the first's verified file
    # instead of writing the same .part beside it.
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: fetch_from(server, tmp_path, "slow"), range(2)))
    assert [p.read_bytes() for p in paths] == [ARCHIVE, ARCHIVE]
    assert server.hits["/slow/data.gz"] == 1
