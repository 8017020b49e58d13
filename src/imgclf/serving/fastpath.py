"""POST /v1/predict as most clients send it, answered without FastAPI's per-request machinery.

For a one-image request FastAPI spent about 0.8 ms of CPU around the model's own work (form
parsing into spooled files, dependency solving, response validation, and two round trips to the
thread pool), where decoding and classifying an 8x8 digit take about 0.15 ms. This ASGI layer
answers the common request itself: Content-Length up to FAST_BODY_BYTES, `multipart/form-data;
boundary=...` with only parts `form-data; name="file"; filename="..."` (a Content-Type at most),
and no query but `top_k=N`. It checks, decodes and classifies with the FastAPI route's own
`Classifier`, and answers the same bytes: pydantic's JSON, the same headers.

Any other request, and every one the classifier refuses (4xx), goes to the FastAPI app with its
body as received, so every error, and every answer but the common one, is FastAPI's own.

A small request to a fast model is decoded and classified on the event loop, where a round trip
to the thread pool would cost more than the work: at most INLINE_PIXELS and INLINE_BYTES, to a
model that classifies one image within INLINE_SECONDS (timed once per model), and only when a
decode slot is free. Anything else is classified in the thread pool, as the route does, so
nothing long holds the event loop.
"""

import contextlib
import math
import re
import time
from collections import deque
from typing import NamedTuple

import numpy as np
import pydantic_core
from anyio import to_thread
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgclf.serving.model import ServedModel

PATH = "/v1/predict"
# Starlette keeps a file part up to 1 MiB in memory and spools a larger one to disk: a larger body
# goes through FastAPI, so memory per request stays what it was.
FAST_BODY_BYTES = 1024 * 1024
INLINE_PIXELS = 64 * 64  # per request: a few small images decode in well under a millisecond
INLINE_BYTES = 64 * 1024  # per request: bounds the header chunks Pillow reads besides the pixels
INLINE_SECONDS = 0.001  # a model's time for one image, beyond which it runs in the thread pool
# RFC 2046 boundary characters, unquoted; a quoted or odd boundary goes through FastAPI.
CONTENT_TYPE = re.compile(rb"multipart/form-data; ?boundary=([0-9A-Za-z'()+_,\-./:=?]{1,70})")
DISPOSITION = re.compile(rb'form-data; name="file"; filename="([^"\\;\r\n]*)"')
TOP_K = re.compile(rb"top_k=([1-9][0-9]{0,5})")
HELD = contextlib.nullcontext()  # the decode slot, taken for the whole request


class Upload(NamedTuple):
    """One part of the field `file`: its file name, the part's Content-Type, the bytes."""

    name: str
    content_type: str
    data: bytes


def parse_form(body: bytes, boundary: bytes, max_files: int) -> list[Upload] | None:
    """The `file` parts of a multipart body, as Starlette's parser reads them; None unless there
    are 1 to max_files parts, every one a plain file part (else Starlette decides)."""
    delimiter = b"\r\n--" + boundary
    segments = (b"\r\n" + body).split(delimiter)
    # Before the first delimiter: nothing. After the last: "--" and at most a CRLF. Between two
    # delimiters: a part, starting with the CRLF that ends the delimiter line (no padding).
    if len(segments) < 3 or segments[0] or segments[-1] not in (b"--", b"--\r\n"):
        return None
    uploads = []
    for segment in segments[1:-1]:
        head_end = segment.find(b"\r\n\r\n")
        if not segment.startswith(b"\r\n") or head_end < 0:
            return None
        name = content_type = None
        for line in segment[2:head_end].split(b"\r\n"):
            field, separator, value = line.partition(b": ")
            field = field.lower()
            if not separator or not value or value[0] in b" \t":
                return None
            if field == b"content-disposition" and name is None:
                match = DISPOSITION.fullmatch(value)
                if match is None:
                    return None
                name = _user_safe_decode(match[1])
            elif field == b"content-type" and content_type is None:
                content_type = value.decode("latin-1")
            else:
                return None  # another header (Content-Transfer-Encoding...), or one twice
        if name is None:
            return None
        uploads.append(Upload(name, content_type or "", segment[head_end + 4 :]))
    return uploads if len(uploads) <= max_files else None


def _user_safe_decode(data: bytes) -> str:
    """A file name as Starlette decodes it: UTF-8, else Latin-1."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


class PredictFastPath:
    """In front of the FastAPI app `api`, behind RequestGuard (the token, declared size and
    content type are checked already)."""

    def __init__(self, api: ASGIApp, live, classifier, max_files: int, version_header: str):
        self.app = api
        self.live = live  # serving.follow.LiveModel
        self.classifier = classifier  # serving.app.Classifier
        self.max_files = max_files
        self.version_header = version_header.lower().encode("latin-1")
        self._inference: tuple[ServedModel, float] | None = None  # (model, seconds for one image)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        form = self._form(scope)
        if form is None:
            await self.app(scope, receive, send)
            return
        boundary, top_k = form
        received, body = await _read_body(receive)
        uploads = None if body is None else parse_form(body, boundary, self.max_files)
        answer = None if uploads is None else await self._answer(uploads, top_k)
        if answer is None:
            await self.app(scope, _replay(received, receive), send)
            return
        body, version = answer
        headers = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
            (self.version_header, version.encode("latin-1")),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _form(self, scope: Scope) -> tuple[bytes, int | None] | None:
        """(boundary, top_k) of a request this layer answers; None for any other request."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PATH:
            return None
        if scope.get("root_path"):
            return None  # mounted under a prefix: FastAPI's routing knows what the path means
        query = scope["query_string"]
        top_k = TOP_K.fullmatch(query) if query else None
        if query and top_k is None:
            return None
        content_type = length = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value if content_type is None else b""
            elif name == b"content-length":
                length = value if length is None else b""
            elif name == b"transfer-encoding":
                return None
        if not (length and length.isdigit() and int(length) <= FAST_BODY_BYTES and content_type):
            return None
        match = CONTENT_TYPE.fullmatch(content_type)
        if match is None:
            return None
        return match[1], int(top_k[1]) if top_k else None

    async def _answer(self, uploads: list[Upload], top_k: int | None) -> tuple[bytes, str] | None:
        """(JSON body, version) for the uploads; None if the classifier refuses them (FastAPI will)."""
        model = self.live.model  # once: a swap during this request does not change its model
        classifier = self.classifier
        small = sum(len(upload.data) for upload in uploads) <= INLINE_BYTES and await self._fast(model)
        answers = None
        try:
            if small and len(uploads) == 1:
                # The header is read once, by the decode, held to the inline limit; a larger image,
                # or a bad one, takes the way below, which tells them apart.
                classifier.check_types(uploads)
                with contextlib.suppress(HTTPException):
                    answers = self._inline(model, uploads, top_k, min(INLINE_PIXELS, classifier.max_pixels))
            if answers is None:
                pixels = classifier.sizes(uploads)
                answers = self._inline(model, uploads, top_k) if small and pixels <= INLINE_PIXELS else None
            if answers is None:
                answers = await to_thread.run_sync(classifier.classify, model, uploads, top_k)
        except HTTPException:
            return None
        return pydantic_core.to_json({"predictions": answers}), model.version

    def _inline(
        self, model: ServedModel, uploads: list[Upload], top_k: int | None, max_pixels: int | None = None
    ) -> list[dict] | None:
        """The answers, computed here on the event loop; None if no decode slot is free."""
        slots = self.classifier.decode_slots
        if not slots.acquire(blocking=False):
            return None
        try:
            return self.classifier.classify(model, uploads, top_k, HELD, max_pixels)
        finally:
            slots.release()

    async def _fast(self, model: ServedModel) -> bool:
        """Whether the model classifies one image within INLINE_SECONDS (timed once per model)."""
        timed = self._inference
        if timed is None or timed[0] is not model:
            timed = self._inference = (model, await to_thread.run_sync(inference_seconds, model))
        return timed[1] <= INLINE_SECONDS


def inference_seconds(model: ServedModel, runs: int = 3) -> float:
    """The fastest of `runs` inferences of one blank image (the first also warms the session up)."""
    blank = np.zeros((1, *model.card.input.shape), dtype=np.uint8)
    seconds = math.inf
    for _ in range(runs):
        started = time.perf_counter()
        try:
            model.predict(blank)
        except Exception:  # the request that follows fails the same way, and answers for it
            return math.inf
        seconds = min(seconds, time.perf_counter() - started)
    return seconds


async def _read_body(receive: Receive) -> tuple[list[Message], bytes | None]:
    """The messages received, and the body if it came whole and within FAST_BODY_BYTES."""
    received: list[Message] = []
    size = 0
    while True:
        message = await receive()
        received.append(message)
        if message["type"] != "http.request":
            return received, None  # the client went away: FastAPI handles that as ever
        size += len(message.get("body", b""))
        if size > FAST_BODY_BYTES:
            return received, None
        if not message.get("more_body", False):
            return received, b"".join(m.get("body", b"") for m in received)


def _replay(received: list[Message], receive: Receive) -> Receive:
    """A receive that gives the messages already read, then reads on."""
    pending = deque(received)

    async def replay() -> Message:
        return pending.popleft() if pending else await receive()

    return replay
