"""A real HTTP server on 127.0.0.1 that serves test files and misbehaves on purpose.

Tests put bodies in `http_mirror.files`: `files["name"]` is served under every mode,
`files["mode/name"]` only under that mode (e.g. a re-compressed copy). The URL `/<mode>/<name>`
picks the behaviour:

ok (or any unknown mode): the file; flaky: 503 once, then the file; cut: half the body then a
dropped connection, once; corrupt: the last 10 bytes changed; html: an error page with status
200; slow: stalls 2 s before answering; missing: 404.
"""

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class MirrorState:
    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)  # request path -> count
    ranges: list[str] = field(default_factory=list)  # Range headers received, in order

    def mirror(self, mode: str = "ok") -> str:
        """A base URL for `data.mirrors`."""
        return f"{self.url}/{mode}/"

    def reset(self) -> None:
        self.files.clear()
        self.hits.clear()
        self.ranges.clear()


class Faulty(BaseHTTPRequestHandler):
    server: "MirrorServer"

    def log_message(self, *args):
        pass

    def do_GET(self):
        state = self.server.state
        mode, _, name = self.path.lstrip("/").partition("/")
        hits = state.hits[self.path] = state.hits.get(self.path, 0) + 1
        body = state.files.get(f"{mode}/{name}", state.files.get(name))
        if mode == "missing" or body is None:
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
            state.ranges.append(self.headers["Range"])
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
        if mode in ("cut", "badrange") and hits == 1:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return None
        if start and mode == "badrange":  # a server that ignores the offset yet answers 206
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
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


class MirrorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Faulty)
        self.state = MirrorState(url=f"http://127.0.0.1:{self.server_address[1]}")

    def handle_error(self, request, client_address):
        pass  # clients that gave up on a slow or cut response are part of the test


@pytest.fixture(scope="session")
def _mirror_server():
    httpd = MirrorServer()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def http_mirror(_mirror_server) -> MirrorState:
    """The running server's state, emptied for each test: fill `files`, read `hits` and `ranges`."""
    _mirror_server.state.reset()
    return _mirror_server.state
