"""The HTTP API and web page of `imgclf serve` (FastAPI).

Routes: GET / (the web page, static/), GET /health, GET /v1/model, POST /v1/predict, GET /metrics,
GET /v1/monitor (the drift monitor, serving.monitoring),
the Open Inference Protocol V2 under /v2 (serving.v2; with a token, all but /v2/health/* need it),
and /docs (Swagger UI from static/swagger-ui/, not a CDN: it works offline); with
`--capture DIR`, also GET /v1/captures, GET /v1/captures/{sha256} and
POST /v1/feedback (serving.capture: the uploads the model is unsure of, and their labels);
following an alias with a webhook secret, POST /v1/webhooks/mlflow (serving.webhook: signed, so
without the token). With a
token, /v1/* need `Authorization: Bearer <token>`; the page, /health, /metrics and the docs stay
open so a browser can load the page and a prober can check liveness. The OpenAPI document always
declares the bearer scheme on /v1/*, as optional: it is the same with a token and without.

Every answer to bad input is a 4xx with a JSON `detail`; an unexpected failure is a 500 with a
JSON `detail` and no traceback (the traceback goes to the server's log).

The model may be swapped while serving (serving.follow): every route reads `live.model` once and
uses that model to the end of the request. /v1/predict says which version answered in the
`X-Model-Version` header.

POST /v1/predict takes the images as multipart field `file` (the web page, `curl -F`), or one image
as the body (`Content-Type: image/*` or application/octet-stream, `curl --data-binary`): two routes
at one path, told apart by the content type (RawImageRoute), with one `Classifier` behind both.
"""

import contextlib
import importlib.metadata
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NamedTuple

import numpy as np
from fastapi import FastAPI, File, Header, HTTPException, Query, Request, Security, UploadFile
from fastapi import Path as PathParameter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgclf.images import BadImage, image_size
from imgclf.serving.follow import LiveModel
from imgclf.serving.limits import DEFAULT_MAX_BODY_BYTES, RequestGuard, is_raw_image, media_type
from imgclf.serving.metrics import CaptureCollector, Metrics, MetricsMiddleware
from imgclf.serving.model import ServedModel
from imgclf.serving.monitoring import DEFAULT_WINDOW, DriftCollector, ServingMonitor
from imgclf.serving.predict import prediction
from imgclf.serving.v2 import add_v2_routes
from imgclf.serving.webhook import add_webhook_route

if TYPE_CHECKING:  # imported by the server only with --capture DIR (off by default)
    from imgclf.serving.capture import Capture

STATIC_DIR = Path(__file__).parent / "static"
MAX_FILES = 64  # per request: each may decode up to max_pixels, so the work per request is bounded
# A request's images together hold at most this many times the per-image pixel limit: a small
# file may decode to a large image, so the body size alone does not bound the memory a request takes.
FULL_SIZE_IMAGES_PER_REQUEST = 4
# Decodes in flight at once, across all requests: each may hold a full-size image in memory.
DECODES_AT_ONCE = os.cpu_count() or 1
# A request this small is classified on the event loop, where the round trip to the thread pool
# would cost more than the work (2 cores at a load average of 3, one 8x8 digit a request: 1,034-1,497
# requests/s through the pool, 1,952-2,006 on the loop; bench/serving_peers.py): at most INLINE_BYTES
# of images that hold at most INLINE_PIXELS in all, to a model that classifies one image within
# INLINE_SECONDS. Anything else goes to the thread pool, so nothing long holds the event loop.
INLINE_BYTES = 64 * 1024
INLINE_PIXELS = 64 * 64
INLINE_SECONDS = 0.001
PART_TYPES = ("application/octet-stream", "")  # besides image/*: what clients send when unsure
SHA256_PATTERN = "^[0-9a-f]{64}$"  # a captured image's name: the SHA-256 of its bytes, in hex
VERSION_HEADER = "X-Model-Version"  # on /v1/predict answers: the version that computed them
BODY_NAME = "body"  # an image sent as the body: its `file` in the answer, unless X-Filename names it
SWAGGER_UI = "swagger-ui"  # under static/: Swagger UI's files, from the pinned npm package (Makefile)
BEARER = HTTPBearer(auto_error=False, description="required when the server runs with `--token`")
TopK = Annotated[int | None, Query(ge=1, description="only the K most probable classes")]
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
    415: {
        "model": ErrorDetail,
        "description": "neither multipart/form-data nor an image body, or a part that is not an image",
    },
}
# POST /v1/predict's second way in (RawImageRoute): one image as the body, beside the multipart form
# FastAPI documents from the route's `file` parameter.
RAW_IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_RAW_BODY = {
    "requestBody": {"content": {"image/*": RAW_IMAGE_BODY, "application/octet-stream": RAW_IMAGE_BODY}},
    "parameters": [
        {
            "name": "X-Filename",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": f"with an image as the body: the `file` of its prediction (default `{BODY_NAME}`)",
        }
    ],
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
    capture: "Capture | None" = None,
    monitor_window: int = DEFAULT_WINDOW,
) -> ASGIApp:
    """The ASGI app: metrics around the request guard around the FastAPI routes.

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
        docs_url=None,  # served below, from this server's own files
        redoc_url=None,
    )
    # Documents the token in /docs ("Authorize"), set or not; RequestGuard enforces it before the
    # body is read.
    secured = [Security(BEARER)]
    generate_openapi = api.openapi  # FastAPI's, which builds the document once and keeps it
    api.openapi = lambda: token_optional(generate_openapi())

    @api.get("/health", response_model=Health, tags=["service"])
    def health() -> dict:
        """Liveness: the model is loaded (it is loaded before the server starts listening)."""
        return {"status": "ok"}

    @api.get("/v1/model", response_model=ModelCard, dependencies=secured, responses=ERRORS, tags=["model"])
    def model_card() -> dict:
        """Classes, input spec, version and lineage of the model served now."""
        return live.model.describe()

    speed = ModelSpeed()

    async def small(model: ServedModel, uploads: list[Upload]) -> bool:
        """Whether the request is small enough to classify on the event loop (INLINE_*); a small
        body's headers are checked here, with the usual 4xx."""
        if sum(len(upload.data) for upload in uploads) > INLINE_BYTES:
            return False
        return await speed.seconds(model) <= INLINE_SECONDS and classifier.sizes(uploads) <= INLINE_PIXELS

    async def answer(response: Response, uploads: list[Upload], top_k: int | None) -> dict:
        """Both ways into POST /v1/predict: check, decode and classify; the version in a header.

        Small work is done on the event loop (INLINE_*); any other runs in the thread pool, so it
        never blocks the event loop (ONNX Runtime releases the GIL while it runs), in one round
        trip: the routes are `async def`, since a plain `def` route also sends its answer's
        validation to the pool, a second trip.
        """
        model = live.model  # once: a swap during this request does not change its model

        def checked_and_classified() -> list[dict]:
            classifier.sizes(uploads)
            return classifier.classify(model, uploads, top_k)

        if await small(model, uploads):
            answers = classifier.classify(model, uploads, top_k, slot=False)
        else:
            answers = await run_in_threadpool(checked_and_classified)
        response.headers[VERSION_HEADER] = model.version
        return {"predictions": answers}

    # First: it takes the requests whose body is an image, and leaves the rest to the next route.
    # Not in the schema: the multipart route below documents both bodies (PREDICT_RAW_BODY).
    async def predict_image(
        request: Request,
        response: Response,
        top_k: TopK = None,
        x_filename: Annotated[str | None, Header()] = None,
    ) -> dict:
        body = await request.body()  # FastAPI's max_body_size counts it as it arrives
        upload = Upload(x_filename or BODY_NAME, request.headers["content-type"], body)
        return await answer(response, [upload], top_k)

    api.router.add_api_route(
        "/v1/predict",
        predict_image,
        methods=["POST"],
        response_model=Predictions,
        include_in_schema=False,
        route_class_override=RawImageRoute,
    )

    @api.post(
        "/v1/predict",
        response_model=Predictions,
        dependencies=secured,
        responses=ERRORS,
        tags=["model"],
        openapi_extra=PREDICT_RAW_BODY,
    )
    async def predict(
        response: Response,
        file: Annotated[
            list[UploadFile], File(min_length=1, description="one or more image files (PNG, JPEG, ...)")
        ],
        top_k: TopK = None,
    ) -> dict:
        """Classify one or more images sent as multipart field `file`, or one image sent as the body
        (`Content-Type: image/*` or application/octet-stream; header `X-Filename`: its name)."""
        uploads = [Upload(u.filename or "", u.content_type or "", await u.read()) for u in file]
        return await answer(response, uploads, top_k)

    def kept() -> "Capture":
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
        from imgclf.serving.capture import CaptureError

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
        from imgclf.serving.capture import CaptureError

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

    if live.following and live.webhook_secret:  # serving.webhook: MLflow says when the alias moves
        add_webhook_route(api, live)

    @api.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        """Swagger UI, every file from this server (the FastAPI recipe for self-hosted docs)."""
        if not (STATIC_DIR / SWAGGER_UI / "swagger-ui-bundle.js").is_file():
            raise HTTPException(404, f"Swagger UI is not installed (static/{SWAGGER_UI}/): `make install`")
        root = request.scope.get("root_path", "").rstrip("/")
        files = f"{root}/static/{SWAGGER_UI}"
        return get_swagger_ui_html(
            openapi_url=f"{root}{api.openapi_url}",
            title=f"{api.title} API",
            swagger_js_url=f"{files}/swagger-ui-bundle.js",
            swagger_css_url=f"{files}/swagger-ui.css",
            swagger_favicon_url=f"{files}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # else a badge from an external validator
        )

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

    add_v2_routes(api, live, classifier, secured, MAX_FILES)  # the Open Inference Protocol, /v2
    api.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    api.add_middleware(InternalErrors)
    paths = frozenset(route.path for route in api.routes)
    guarded = RequestGuard(api, max_body_bytes=max_body_bytes, token=token)
    return MetricsMiddleware(guarded, metrics, paths)


def token_optional(openapi: dict) -> dict:
    """The document with every operation that names the bearer scheme also open to no credentials
    (`{}`, OpenAPI's optional security): the same document serves with `--token` and without."""
    for operations in openapi.get("paths", {}).values():
        for operation in operations.values():
            security = operation.get("security") if isinstance(operation, dict) else None
            if security and {} not in security:
                security.append({})
    return openapi


class RawImageRoute(APIRoute):
    """A route that takes only requests whose body is one image (limits.is_raw_image): any other
    request to its path goes on to the next route at that path, as if this one were not there."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is Match.FULL and not is_raw_image(media_type(Headers(scope=scope))):
            return Match.NONE, {}
        return match, child_scope


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


class Upload(NamedTuple):
    """One image of a request: its file name, its content type (the part's or the body's), the bytes."""

    name: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Classifier:
    """What POST /v1/predict does with the uploads of a request, however its body was parsed:
    check (content types, then every image header), then decode and classify. An answer to bad
    input is an HTTPException."""

    metrics: Metrics
    max_pixels: int  # the server's setting: the same for every version
    decode_slots: threading.BoundedSemaphore
    capture: "Capture | None" = None  # offered every classified upload; it keeps the ones it wants
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
        self, model: ServedModel, uploads: list[Upload], top_k: int | None, slot: bool = True
    ) -> list[dict]:
        """Decode (each in one of the decode slots, unless `slot` is False: a decode of at most
        INLINE_PIXELS on the event loop, which must not wait for one) and classify."""
        images, sizes = [], []
        for upload in uploads:
            with self.decode_slots if slot else contextlib.nullcontext(), _bad_image_is_400(upload.name):
                pixels, source = model.decode(upload.data)
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

    def classify_files(self, model: ServedModel, files: list[tuple[str, bytes]]) -> np.ndarray:
        """Encoded images sent without a content type (serving.v2's BYTES input), checked and
        classified as uploads are: probabilities (N, classes), float32."""
        uploads = [Upload(name, "", data) for name, data in files]
        self.sizes(uploads)
        answers = self.classify(model, uploads, None)
        # Every class in order, as Python floats made from the float32 values: the same numbers.
        return np.array([list(answer["probabilities"].values()) for answer in answers], dtype=np.float32)

    def classify_pixels(self, model: ServedModel, batch: np.ndarray) -> np.ndarray:
        """Pixels sent as the model's input (serving.v2's UINT8 tensor, N, C, H, W): counted and
        watched by the drift monitor as uploads are, with no upload size, and not captured (there
        is no file to keep). Probabilities (N, classes)."""
        probabilities = model.predict(batch)
        classes = model.card.classes
        for index in probabilities.argmax(axis=1).tolist():
            self.metrics.predicted(classes[index])
        self.metrics.confidences(probabilities)
        if self.monitor is not None:
            self.monitor.observe(model, batch, probabilities)
        return probabilities


class ModelSpeed:
    """Seconds the served model takes for one image, timed once per model (in the thread pool)."""

    def __init__(self):
        self.timed: tuple[ServedModel, float] | None = None  # the last model timed: a swap re-times

    async def seconds(self, model: ServedModel) -> float:
        timed = self.timed
        if timed is None or timed[0] is not model:
            timed = self.timed = (model, await run_in_threadpool(inference_seconds, model))
        return timed[1]


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


@contextlib.contextmanager
def _bad_image_is_400(name: str) -> Iterator[None]:
    try:
        yield
    except BadImage as error:
        raise HTTPException(400, f"file {name!r}: {error}") from None
