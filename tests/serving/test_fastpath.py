"""The fast path of POST /v1/predict (serving.fastpath): the same answers as the FastAPI route, byte
for byte, for the requests it takes and for those it hands on; small work on the event loop only."""

import asyncio
import dataclasses
import re
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser

from imgclf.serving.app import MAX_FILES, create_app
from imgclf.serving.fastpath import INLINE_PIXELS, INLINE_SECONDS, parse_form
from imgclf.serving.model import ServedModel
from tests.serving.conftest import encode, grey_png, running_server

BOUNDARY = "fast-path-test-boundary"
PNG_PART = b'Content-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'


def body(*parts: bytes, boundary: str = BOUNDARY, preamble: bytes = b"", epilogue: bytes = b"\r\n") -> bytes:
    """A multipart body of `parts`, each its header lines, a blank line, and its content."""
    delimiter = f"--{boundary}".encode()
    inner = b"".join(delimiter + b"\r\n" + part + b"\r\n" for part in parts)
    return preamble + inner + delimiter + b"--" + epilogue


def file_part(data: bytes, filename: bytes = b"a.png", content_type: bytes | None = b"image/png") -> bytes:
    head = b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
    if content_type is not None:
        head += b"Content-Type: " + content_type + b"\r\n"
    return head + b"\r\n" + data


def starlette_reads(content: bytes, boundary: str = BOUNDARY) -> list[tuple[str, str, bytes]]:
    """(file name, Content-Type, bytes) of each `file` part, as FastAPI's form parser reads them."""

    async def parse():
        async def stream():
            yield content

        headers = Headers({"content-type": f"multipart/form-data; boundary={boundary}"})
        form = await MultiPartParser(headers, stream(), max_files=MAX_FILES, max_fields=MAX_FILES).parse()
        uploads = form.getlist("file")
        return [(u.filename, u.content_type or "", await u.read()) for u in uploads]

    return asyncio.run(parse())


NEAR_BOUNDARY = b"\r\n--" + BOUNDARY.encode()[:-1] + b"\r\n\r\n--\r\n"  # not quite a delimiter


@pytest.mark.parametrize(
    "content",
    [
        body(file_part(b"\x89PNG pixels")),
        body(file_part(b"one"), file_part(b"two", b"b.png", None), file_part(b"", b"c.jpg", b"image/jpeg")),
        body(file_part(b"data with" + NEAR_BOUNDARY + b"inside")),
        body(file_part(b"x", "ünïcødé.png".encode())),
        body(file_part(b"x", "café.png".encode("latin-1"))),  # not UTF-8: read as Latin-1
        body(file_part(b"x", b"")),
        body(file_part(b"x", content_type=b"application/octet-stream; charset=x")),
        body(file_part(b"x"), epilogue=b""),
    ],
)
def test_parse_form_reads_what_starlette_reads(content):
    assert parse_form(content, BOUNDARY.encode(), MAX_FILES) == starlette_reads(content)


@pytest.mark.parametrize(
    "content",
    [
        body(file_part(b"x"), preamble=b"a preamble\r\n"),
        body(file_part(b"x", b"C:\\\\photos\\\\a.png")),  # Starlette keeps the last path component
        body(b"Content-Disposition: form-data; name=\"file\"; filename*=utf-8''a.png\r\n\r\nx"),
        body(b'Content-Disposition: form-data; name="file"\r\n\r\nnot a file'),
        body(b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nx'),
        body(b"Content-Transfer-Encoding: base64\r\n" + PNG_PART + b"eA=="),
        body(b"Content-Disposition:" + PNG_PART.split(b":", 1)[1].lstrip() + b"x"),  # no space after ":"
        body(file_part(b"x" + b"\r\n--" + BOUNDARY.encode() + b"garbage")),  # a delimiter, then junk
        body(),
        body(*[file_part(b"x")] * (MAX_FILES + 1)),
        b"--" + BOUNDARY.encode() + b"\r\n" + file_part(b"x"),  # never closed
    ],
)
def test_parse_form_hands_anything_unusual_to_fastapi(content):
    assert parse_form(content, BOUNDARY.encode(), MAX_FILES) is None


@pytest.fixture(scope="module")
def both_apps(served_model):
    """The same model served with the fast path and without it (every request through FastAPI)."""
    with (
        running_server(create_app(served_model)) as fast,
        running_server(create_app(served_model, fast_path=False)) as plain,
    ):
        yield fast, plain


def requests_to_compare(digits_splits) -> list[tuple[str, bytes, str]]:
    """(query, body, Content-Type) of requests the fast path takes, and of some it hands on."""
    images = digits_splits["test"][0]
    digit = grey_png(images[0])
    large = encode(Image.fromarray(np.kron(images[1][0], np.ones((10, 10), np.uint8))))  # 80x80
    jpeg = encode(Image.fromarray(images[2][0]), "JPEG", quality=95)
    form = f"multipart/form-data; boundary={BOUNDARY}"
    return [
        ("", body(file_part(digit)), form),
        ("top_k=3", body(file_part(digit)), form),
        ("", body(*[file_part(grey_png(images[i]), f"{i}.png".encode()) for i in range(3)]), form),
        ("", body(file_part(digit, "ünïcødé.png".encode(), None)), form),
        ("", body(file_part(jpeg, b"a.jpg", b"application/octet-stream")), form),
        ("", body(file_part(large)), form),  # above the inline limit: the thread pool
        ("top_k=2", body(file_part(large), file_part(digit)), form),
        ("", body(file_part(b"not an image")), form),  # 400
        ("", body(file_part(digit), file_part(digit[:30])), form),  # truncated: 400
        ("", body(file_part(digit, content_type=b"text/plain")), form),  # 415
        ("top_k=0", body(file_part(digit)), form),  # 422
        ("top_k=3&x=1", body(file_part(digit)), form),  # handed on, answered alike
        ("", body(b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + digit), form),
        ("", body(*[file_part(digit)] * (MAX_FILES + 1)), form),  # 400: too many files
        ("", body(file_part(digit), boundary="quoted"), 'multipart/form-data; boundary="quoted"'),
        ("", body(file_part(digit), preamble=b"preamble\r\n"), form),
    ]


def test_fast_path_answers_byte_for_byte_as_fastapi(both_apps, digits_splits):
    fast, plain = both_apps
    statuses = []
    with (
        httpx.Client(base_url=fast, timeout=30) as to_fast,
        httpx.Client(base_url=plain, timeout=30) as to_plain,
    ):
        for query, content, content_type in requests_to_compare(digits_splits):
            url = f"/v1/predict?{query}" if query else "/v1/predict"
            answers = [
                client.post(url, content=content, headers={"content-type": content_type})
                for client in (to_fast, to_plain)
            ]
            got, expected = [(a.status_code, a.content, headers(a)) for a in answers]
            assert got == expected, (query, content[:200])
            statuses.append(got[0])
        counted = [metric_lines(client.get("/metrics").text) for client in (to_fast, to_plain)]
    assert {200, 400, 415, 422} <= set(statuses)  # both the fast path's answers and FastAPI's
    assert counted[0] == counted[1]  # requests by route and status, predictions by class


def headers(response: httpx.Response) -> list[tuple[str, str]]:
    return sorted((k, v) for k, v in response.headers.multi_items() if k != "date")  # the time differs


def metric_lines(exposition: str) -> list[str]:
    """The request and prediction counters of a /metrics page (not latency: it differs)."""
    counters = re.compile(r"imgclf_(http_requests|predictions)_total\{")
    return sorted(
        line for line in exposition.splitlines() if counters.match(line) and 'route="/metrics"' not in line
    )


def test_small_work_runs_on_the_event_loop_and_the_rest_in_the_thread_pool(served_model, digits_splits):
    decoded_on_loop = []

    class Recorded(ServedModel):
        def preprocess(self, data, max_pixels=None):
            try:
                asyncio.get_running_loop()
                decoded_on_loop.append(True)
            except RuntimeError:  # no loop in this thread: a worker thread
                decoded_on_loop.append(False)
            return super().preprocess(data, max_pixels)

    class Slow(Recorded):
        def predict(self, images):
            time.sleep(INLINE_SECONDS * 3)
            return super().predict(images)

    fields = {f.name: getattr(served_model, f.name) for f in dataclasses.fields(served_model)}
    images = digits_splits["test"][0]
    digit = ("a.png", grey_png(images[0]), "image/png")
    side = int(INLINE_PIXELS**0.5) + 1
    large = ("b.png", encode(Image.new("L", (side, side), 255)), "image/png")
    for model, files, on_loop in [
        (Recorded(**fields), [digit], True),
        (Recorded(**fields), [digit, digit], True),
        (Recorded(**fields), [large], False),
        (Slow(**fields), [digit], False),
    ]:
        decoded_on_loop.clear()
        with running_server(create_app(model)) as url, httpx.Client(base_url=url, timeout=30) as client:
            response = client.post("/v1/predict", files=[("file", f) for f in files])
        assert response.status_code == 200
        assert decoded_on_loop[-len(files) :] == [on_loop] * len(files)
