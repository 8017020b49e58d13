"""Downloads against a real HTTP server on 127.0.0.1 that misbehaves on purpose."""

import gzip
import hashlib
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from imgclf.data.fetch import DownloadError, RemoteFile, fetch

PAYLOAD = random.Random(0).randbytes(1 << 20)  # incompressible: the archive is 1 MiB too
ARCHIVE = gzip.compress(PAYLOAD, mtime=0)
RECOMPRESSED = gzip.compress(PAYLOAD, compresslevel=1, mtime=12345)
SHA = hashlib.sha256(ARCHIVE).hexdigest()
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Faulty(BaseHTTPRequestHandler):
    """/<mode>/<file>: ok, recompressed, flaky (503 once), cut (half a body once), corrupt,
    html (an error page with status 200), slow (stalls before answering), missing (404)."""

    hits: ClassVar[dict[str, int]] = {}
    ranges: ClassVar[list[str]] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        mode = self.path.split("/")[1]
        hits = Faulty.hits[self.path] = Faulty.hits.get(self.path, 0) + 1
        body = RECOMPRESSED if mode == "recompressed" else ARCHIVE
        if mode == "missing":
            return self.send_error(404)
        if mode == "flaky" and hits == 1:
            return self.send_error(503)
        if mode == "slow":
            time.sleep(2)
        if mode == "html":
            return self.reply(200, b"<html><body>Service unavailable</body></html>", "text/html")
        if mode == "corrupt":
            body = body[:-10] + b"0123456789"
        start = 0
        if "Range" in self.headers:
            Faulty.ranges.append(self.headers["Range"])
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
        if mode == "cut" and hits == 1:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return None
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])
            return None
        return self.reply(200, body, "application/octet-stream")

    def reply(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients that gave up on a slow or cut response are part of the test


@pytest.fixture(scope="module")
def server():
    httpd = QuietServer(("127.0.0.1", 0), Faulty)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(autouse=True)
def fresh_counters():
    Faulty.hits.clear()
    Faulty.ranges.clear()


REMOTE = RemoteFile("data.gz", sha256=SHA, payload_sha256=PAYLOAD_SHA)


def fetch_from(server, cache, *modes, **kwargs):
    return fetch(REMOTE, [f"{server}/{mode}/" for mode in modes], cache, backoff=0.01, **kwargs)


def test_plain_download_verifies_and_is_cached(server, tmp_path):
    path = fetch_from(server, tmp_path, "ok")
    assert path.read_bytes() == ARCHIVE
    assert fetch_from(server, tmp_path, "missing") == path  # the cache answers, no mirror asked
    assert list(tmp_path.iterdir()) == [path]


def test_503_is_retried(server, tmp_path):
    assert fetch_from(server, tmp_path, "flaky").read_bytes() == ARCHIVE
    assert Faulty.hits["/flaky/data.gz"] == 2


def test_cut_connection_resumes_with_a_range_request(server, tmp_path):
    assert fetch_from(server, tmp_path, "cut").read_bytes() == ARCHIVE
    # Whole chunks received before the cut are kept; only the rest is asked for again.
    (asked,) = Faulty.ranges
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
