"""The checks a request passes before its body is read: bearer token, content type, declared size.

An ASGI layer outside the FastAPI app, so a refused request costs no body parsing and every
refusal is a JSON `{"detail": ...}`. The body size is also counted while it is read (FastAPI's
`max_body_size`), so a body sent without Content-Length, or chunked, is held to the same limit.
"""

import json
import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

MIB = 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 10 * MIB  # `imgclf serve --max-body-mb` states it in its help: keep them equal
PROTECTED_PREFIX = "/v1/"
FORM_ROUTES = frozenset({("POST", "/v1/predict")})


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
            await send_json(send, status, detail, extra)

    def refusal(self, scope: Scope, headers: Headers) -> tuple[int, str, dict[str, str]] | None:
        """(status, detail, extra headers) if the request is refused, else None."""
        path = scope["path"]
        if self.token is not None and path.startswith(PROTECTED_PREFIX):
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
        if (scope["method"], path) in FORM_ROUTES:
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "multipart/form-data":
                detail = (
                    f"content type {media_type or 'none'!r} is not supported: "
                    "send multipart/form-data with the images in the field `file`"
                )
                return 415, detail, {}
        return None


def has_body(headers: Headers) -> bool:
    return headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers


async def send_json(send: Send, status: int, detail: str, extra: dict[str, str]) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
