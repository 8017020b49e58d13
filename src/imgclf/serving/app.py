"""The HTTP API and web page of `imgclf serve` (FastAPI).

Routes: GET / (the web page, static/), GET /health, GET /v1/model, POST /v1/predict, GET /metrics,
GET /v1/monitor (the drift monitor, serving.monitoring),
and FastAPI's /docs; with `--capture DIR`, also GET /v1/captures, GET /v1/captures/{sha256} and
POST /v1/feedback (serving.capture: the uploads the model is unsure of, and their labels). With a
token, /v1/* need `Authorization: Bearer <token>`; the page, /health, /metrics and the docs stay
open so a browser can load the page and a prober can check liveness.

Every answer to bad input is a 4xx with a JSON `detail`; an unexpected failure is a 500 with a
JSON `detail` and no traceback (the traceback goes to the server's log).

The model may be swapped while serving (serving.follow): every route reads `live.model` once and
uses that model to the end of the request. /v1/predict says which version answered in the
`X-Model-Version` header.

The common POST /v1/predict is answered in front of FastAPI (serving.fastpath) with the route's
own `Classifier` and the same bytes; any other request, and every refusal, is FastAPI's.
"""

import contextlib
import importlib.metadata
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Security, UploadFile
from fastapi import Path as PathParameter
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgclf.images import BadImage, image_size
from imgclf.serving.capture import Capture, CaptureError
from imgclf.serving.fastpath import PredictFastPath, Upload
from imgclf.serving.follow import LiveModel
from imgclf.serving.limits import DEFAULT_MAX_BODY_BYTES, RequestGuard
from imgclf.serving.metrics import CaptureCollector, Metrics, MetricsMiddleware
from imgclf.serving.model import ServedModel
from imgclf.serving.monitoring import DEFAULT_WINDOW, DriftCollector, ServingMonitor
from imgclf.serving.predict import prediction

STATIC_DIR = Path(__file__).parent / "static"
MAX_FILES = 64  # per request: each may decode up to max_pixels, so the work per request is bounded
# A request's images together hold at most this many times the per-image pixel limit: a small
# file may decode to a large image, so the body size alone does not bound the memory a request takes.
FULL_SIZE_IMAGES_PER_REQUEST = 4
# Decodes in flight at once, across all requests: each may hold a full-size image in memory.
DECODES_AT_ONCE = os.cpu_count() or 1
PART_TYPES = ("application/octet-stream", "")  # besides image/*: what clients send when unsure
SHA256_PATTERN = "^[0-9a-f]{64}$"  # a captured image's name: the SHA-256 of its bytes, in hex
VERSION_HEADER = "X-Model-Version"  # on /v1/predict answers: the version that computed them
log = logging.getLogger("imgclf.serving")


class Health(BaseModel):
    status: Literal["ok"]


class ModelCard(BaseModel):
    """The served model. The web page reads name, version, classes, input and registry."""

    name: str
    version: str
    source: str
    sha256: str
    classes: list[str]
    input: dict
    normalization: dict
    quantization: dict  # {"scheme": "none"} (float32) or "int8" with how it was calibrated
    lineage: dict
    registry: dict | None


class Prediction(BaseModel):
    file: str
    label: str
    index: int
    probabilities: dict[str, float]


class Predictions(BaseModel):
    predictions: list[Prediction]


class ErrorDetail(BaseModel):
    detail: str | list


class CapturedImage(BaseModel):
    """A captured image: its SHA-256 (GET /v1/captures/{sha256} gives its bytes), when and by
    which model it was kept, the model's guess and its probability, why it was kept."""

    sha256: str
    time: str | None
    model: dict | None
    label: str | None
    probability: float | None
    reason: str | None
    true_label: str | None


class CapturedImages(BaseModel):
    enabled: bool  # whether this server keeps images (`imgclf serve --capture DIR`)
    waiting: int  # captured images without a label, in all
    captures: list[CapturedImage]  # the oldest first: they are the first to be deleted


class Feedback(BaseModel):
    sha256: str = Field(pattern=SHA256_PATTERN, description="the captured image's, from GET /v1/captures")
    label: str  # the true class: one of the served model's classes


ERRORS = {
    400: {"model": ErrorDetail, "description": "not an image, truncated, or too many pixels"},
    401: {"model": ErrorDetail, "description": "a token is set and the request lacks it"},
    413: {"model": ErrorDetail, "description": "request body, or the images' pixels in all, over the limit"},
    415: {"model": ErrorDetail, "description": "not multipart/form-data, or a part that is not an image"},
}
CAPTURE_ERRORS = {
    401: ERRORS[401],
    404: {"model": ErrorDetail, "description": "capture is off (no --capture), or no such captured image"},
}


def create_app(
    model: ServedModel | LiveModel,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    decodes_at_once: int = DECODES_AT_ONCE,
    fast_path: bool = True,
    capture: Capture | None = None,
    monitor_window: int = DEFAULT_WINDOW,
) -> ASGIApp:
    """The ASGI app: metrics around the request guard around the FastAPI routes.

    fast_path: answer the common POST /v1/predict in serving.fastpath (the same answers, without
    FastAPI's per-request cost); False sends every request through FastAPI.
    capture: keep the uploads the model is unsure of, for labelling (serving.capture); None: off.
    monitor_window: images per drift window (serving.monitoring); 0: no drift monitor.
    """
    live = model if isinstance(model, LiveModel) else LiveModel(model)
    metrics = Metrics(live)
    monitor = ServingMonitor(live, monitor_window)
    metrics.registry.register(DriftCollector(monitor))
    classifier = Classifier(
        metrics, live.model.max_pixels, threading.BoundedSemaphore(decodes_at_once), capture, monitor
    )
    if capture is not None:
        capture.signals = monitor.signals  # the drift state, in each capture's manifest line
        metrics.registry.register(CaptureCollector(capture))
    following = f", following `{live.registry.uri}`" if live.following else ""
    description = f"Image classifier `{live.model.name}`{following}. GET /v1/model: the version served now."
    api = FastAPI(
        title="imgclf",
        version=importlib.metadata.version("imgclf"),  # pyproject.toml's
        description=description,
        max_body_size=max_body_bytes,
        form_limits={"max_files": MAX_FILES, "max_fields": MAX_FILES},
    )
    # Documents the token in /docs ("Authorize"); RequestGuard enforces it before the body is read.
    secured = [Security(HTTPBearer(auto_error=False))] if token else []

    @api.get("/health", response_model=Health, tags=["service"])
    def health() -> dict:
        """Liveness: the model is loaded (it is loaded before the server starts listening)."""
        return {"status": "ok"}

    @api.get("/v1/model", response_model=ModelCard, dependencies=secured, responses=ERRORS, tags=["model"])
    def model_card() -> dict:
        """Classes, input spec, version and lineage of the model served now."""
        return live.model.describe()

    @api.post(
        "/v1/predict", response_model=Predictions, dependencies=secured, responses=ERRORS, tags=["model"]
    )
    def predict(
        response: Response,
        file: Annotated[
            list[UploadFile], File(min_length=1, description="one or more image files (PNG, JPEG, ...)")
        ],
        top_k: Annotated[int | None, Query(ge=1, description="only the K most probable classes")] = None,
    ) -> dict:
        """Classify one or more images sent as multipart field `file`.

        A plain `def`: FastAPI runs it in its thread pool, so decoding and inference never block
        the event loop (ONNX Runtime releases the GIL while it runs).
        """
        model = live.model  # once: a swap during this request does not change its model
        uploads = [Upload(u.filename or "", u.content_type or "", u.file.read()) for u in file]
        classifier.sizes(uploads)
        answers = classifier.classify(model, uploads, top_k)
        response.headers[VERSION_HEADER] = model.version
        return {"predictions": answers}

    def kept() -> Capture:
        if capture is None:
            raise HTTPException(404, "capture is off: start the server with `imgclf serve --capture DIR`")
        return capture

    @api.get(
        "/v1/captures",
        response_model=CapturedImages,
        dependencies=secured,
        responses=CAPTURE_ERRORS,
        tags=["labelling"],
    )
    def captures(
        limit: Annotated[int, Query(ge=1, le=200, description="at most this many images")] = 50,
        offset: Annotated[int, Query(ge=0, description="skip this many of the oldest")] = 0,
    ) -> dict:
        """The captured images that await a label (`imgclf serve --capture DIR`), the oldest first;
        `enabled` false and none when capture is off."""
        if capture is None:
            return {"enabled": False, "waiting": 0, "captures": []}
        waiting, page = capture.pending(limit, offset)
        return {"enabled": True, "waiting": waiting, "captures": page}

    @api.get(
        "/v1/captures/{sha256}",
        dependencies=secured,
        responses={**CAPTURE_ERRORS, 200: {"content": {"image/*": {}}, "description": "the uploaded bytes"}},
        response_class=FileResponse,
        tags=["labelling"],
    )
    def captured_image(sha256: Annotated[str, PathParameter(pattern=SHA256_PATTERN)]) -> FileResponse:
        """A captured image's bytes as uploaded."""
        try:
            path, media_type = kept().image(sha256)
        except CaptureError as error:
            raise HTTPException(error.status, error.detail) from None
        if not path.is_file():
            raise HTTPException(404, f"captured image {sha256} is no longer on disk")
        headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"}
        return FileResponse(path, media_type=media_type, headers=headers)

    @api.post(
        "/v1/feedback",
        response_model=CapturedImage,
        dependencies=secured,
        responses={
            **CAPTURE_ERRORS,
            400: {"model": ErrorDetail, "description": "a body that is not JSON"},
            422: {"model": ErrorDetail, "description": "a label not among the classes, or not a SHA-256"},
            503: {"model": ErrorDetail, "description": "the capture folder cannot be written now"},
        },
        tags=["labelling"],
    )
    def feedback(body: Feedback) -> dict:
        """Give a captured image its true label: it moves to DIR/labelled/<label>/, for
        `data.extra_train`. Labelling it again moves it to the new label's folder."""
        target = kept()
        classes = live.model.card.classes
        if body.label not in classes:
            shown = ", ".join(classes[:20]) + (", …" if len(classes) > 20 else "")
            raise HTTPException(422, f"label {body.label!r} is not one of the model's classes ({shown})")
        try:
            return target.label(body.sha256, body.label)
        except CaptureError as error:
            raise HTTPException(error.status, error.detail) from None

    @api.get("/v1/monitor", dependencies=secured, responses={401: ERRORS[401]}, tags=["model"])
    def drift_monitor() -> dict:
        """The drift monitor: the reference's summary, per signal the last window's statistic,
        p-value and alarm (Bonferroni: at most 1 % of windows like the reference alarm), the last
        windows."""
        return monitor.state()

    @api.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @api.get("/", include_in_schema=False)
    def page() -> FileResponse:
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            raise HTTPException(404, "the web page is not installed (no static/index.html)")
        return FileResponse(index)

    api.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    api.add_middleware(InternalErrors)
    paths = frozenset(route.path for route in api.routes)
    app: ASGIApp = api
    if fast_path:  # outside FastAPI, so InternalErrors again: for a bug in the fast path
        app = InternalErrors(PredictFastPath(api, live, classifier, MAX_FILES, VERSION_HEADER))
    guarded = RequestGuard(app, max_body_bytes=max_body_bytes, token=token)
    return MetricsMiddleware(guarded, metrics, paths)


class InternalErrors:
    """A bug becomes a JSON 500 for the client and a traceback in the server's log.

    Handled here rather than re-raised to uvicorn (Starlette's default), which would close the
    connection under a client that may still be sending, and reset it instead of answering.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_started(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_started)
        except Exception:
            if scope["type"] != "http" or started:
                raise  # nothing useful can be sent any more
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            await JSONResponse({"detail": "internal server error"}, status_code=500)(scope, receive, send)


@dataclass(frozen=True)
class Classifier:
    """What POST /v1/predict does with the uploads of a request, however its body was parsed:
    check (content types, then every image header), then decode and classify. An answer to bad
    input is an HTTPException."""

    metrics: Metrics
    max_pixels: int  # the server's setting: the same for every version
    decode_slots: threading.BoundedSemaphore
    capture: Capture | None = None  # offered every classified upload; it keeps the ones it wants
    monitor: ServingMonitor | None = None  # the drift monitor: every classified batch

    def check_types(self, uploads: list[Upload]) -> None:
        """415 if a part's content type is not an image's (or one that clients send when unsure)."""
        for upload in uploads:
            media_type = upload.content_type.split(";")[0].strip().lower()
            if not media_type.startswith("image/") and media_type not in PART_TYPES:
                detail = f"file {upload.name!r}: content type {media_type!r} is not an image type"
                raise HTTPException(415, detail)

    def sizes(self, uploads: list[Upload]) -> int:
        """The images' pixels in all, from their headers; 415, 400 or 413 if refused."""
        self.check_types(uploads)
        pixels = 0
        for upload in uploads:  # every header before any decoding: a refusal costs little
            with _bad_image_is_400(upload.name):
                width, height = image_size(upload.data, self.max_pixels)
            pixels += width * height
        limit = FULL_SIZE_IMAGES_PER_REQUEST * self.max_pixels
        if pixels > limit:
            raise HTTPException(
                413,
                f"the {len(uploads)} images hold {pixels} pixels in all, over the limit of "
                f"{limit} per request: send fewer or smaller images",
            )
        return pixels

    def classify(
        self,
        model: ServedModel,
        uploads: list[Upload],
        top_k: int | None,
        slots: contextlib.AbstractContextManager | None = None,
        max_pixels: int | None = None,
    ) -> list[dict]:
        """Decode (each in one of the decode slots, or all in `slots`, held already; max_pixels
        below the server's for a decode that must stay small) and classify."""
        images, sizes = [], []
        for upload in uploads:
            with slots or self.decode_slots, _bad_image_is_400(upload.name):
                pixels, source = model.decode(upload.data, max_pixels)
            images.append(pixels)
            sizes.append((source.width, source.height))  # as uploaded: the drift monitor's size, aspect
        # One image needs no copy: its (1, C, H, W) view is contiguous as the session wants it.
        batch = images[0][None] if len(images) == 1 else np.stack(images)
        probabilities = model.predict(batch)
        classes = model.card.classes
        answers = [prediction(u.name, p, classes, top_k) for u, p in zip(uploads, probabilities, strict=True)]
        for answer in answers:
            self.metrics.predicted(answer["label"])
        self.metrics.confidences(probabilities)
        if self.monitor is not None:
            self.monitor.observe(model, batch, probabilities, np.array(sizes))
        if self.capture is not None:
            self.capture.offer(model, uploads, probabilities)
        return answers


@contextlib.contextmanager
def _bad_image_is_400(name: str) -> Iterator[None]:
    try:
        yield
    except BadImage as error:
        raise HTTPException(400, f"file {name!r}: {error}") from None
