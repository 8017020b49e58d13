"""The checks a request passes before its body is read: bearer token, content type, declared size.

An ASGI layer outside the FastAPI app, so a refused request costs no body parsing and every
refusal is a JSON `{"detail": ...}` (`{"error": ...}` under /v2, the Open Inference Protocol's
form). The body size is also counted while it is read (FastAPI's
`max_body_size`), so a body sent without Content-Length, or chunked, is held to the same limit.
"""

import json
import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from imgclf.serving.webhook import WEBHOOK_PATH

MIB = 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 10 * MIB  # `imgclf serve --max-body-mb` states it in its help: keep them equal
PROTECTED_PREFIX = "/v1/"
# Under /v1/ but without the token: MLflow cannot send one; the route checks its signature instead.
SIGNED_PATHS = frozenset({WEBHOOK_PATH})
V2_PATH = "/v2"  # the Open Inference Protocol (serving.v2): /v2 and under it, with the token
OPEN_V2_PREFIX = "/v2/health/"  # but its probes, open as /health is: KServe's probers send no token
# Routes that take images: as multipart/form-data, or one image as the body (is_raw_image).
UPLOAD_ROUTES = frozenset({("POST", "/v1/predict")})
BODY_TYPES = ("application/octet-stream",)  # besides image/*: what clients send for plain bytes


class RequestGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int, token: str | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self.refusal(scope, headers)
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            status, detail, extra = refusal
            if has_body(headers):
                # The body is left unread: close the connection rather than parse what follows it.
                extra = {**extra, "connection": "close"}
            await send_json(send, status, detail, extra, "error" if is_v2(scope["path"]) else "detail")

    def refusal(self, scope: Scope, headers: Headers) -> tuple[int, str, dict[str, str]] | None:
        """(status, detail, extra headers) if the request is refused, else None."""
        path = scope["path"]
        if self.token is not None and needs_token(path):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            # The scheme is case-insensitive (RFC 7235). The token, as the bytes sent (Starlette
            # decodes header values as latin-1), is compared in constant time.
            token = given.lstrip(" ").encode("latin-1")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token, self.token):
                detail = "missing or wrong bearer token: send `Authorization: Bearer <token>`"
                return 401, detail, {"www-authenticate": "Bearer"}
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return 413, f"request body of {int(length)} bytes is over the limit of {self.max_body_bytes}", {}
        if (scope["method"], path) in UPLOAD_ROUTES:
            sent = media_type(headers)
            if sent != "multipart/form-data" and not is_raw_image(sent):
                detail = (
                    f"content type {sent or 'none'!r} is not supported: send one image as the body "
                    "(image/*), or multipart/form-data with the images in the field `file`"
                )
                return 415, detail, {}
        return None


def media_type(headers: Headers) -> str:
    """The request's Content-Type without its parameters, in lower case ('' if none)."""
    return headers.get("content-type", "").split(";")[0].strip().lower()


def is_raw_image(media_type: str) -> bool:
    """Whether a body of this media type is taken as one image's bytes."""
    return media_type.startswith("image/") or media_type in BODY_TYPES


def needs_token(path: str) -> bool:
    """/v1/* but the signed webhook; /v2 and /v2/* but the protocol's health probes."""
    if path.startswith(PROTECTED_PREFIX):
        return path not in SIGNED_PATHS
    return is_v2(path) and not path.startswith(OPEN_V2_PREFIX)


def is_v2(path: str) -> bool:
    return path == V2_PATH or path.startswith(V2_PATH + "/")


def has_body(headers: Headers) -> bool:
    return headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers


async def send_json(send: Send, status: int, detail: str, extra: dict[str, str], key: str = "detail") -> None:
    body = json.dumps({key: detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
