"""POST /v1/webhooks/mlflow: the registry says at once that the served alias moved.

An `mlflow server` posts an event to each registered webhook when an alias is set or deleted
(`model_version_alias.created`, `.deleted`; `imgclf webhook register` registers this route). An
event for the alias the server follows wakes its poller (serving.follow), which asks the registry
which version the alias names and swaps exactly as a timed poll does: same checks, same refusals.
The event's own version is not trusted for anything; it only says when to ask. Polling every
`--refresh` seconds stays, for a delivery that is lost.

MLflow signs each delivery as Standard Webhooks do (mlflow/webhooks/delivery.py):
`X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret, "<delivery id>.<timestamp>.<body>")>`, with
`X-MLflow-Delivery-Id` and `X-MLflow-Timestamp` (Unix seconds) as headers. The route recomputes
the HMAC over the body as received, with the shared secret, and compares in constant time; a
timestamp more than TOLERANCE_S away from the server's clock is refused, so a captured delivery
cannot be replayed later. A replay within the window only causes one more poll, which swaps
nothing that the registry does not say. Anything unsigned or badly signed is a 401 and wakes
nothing. The signature is the route's authentication: the bearer token of /v1/* does not apply
to it (serving.limits), as MLflow cannot send one.

The route exists only when the server follows an alias and has a secret (`--webhook-secret`, or
IMGCLF_WEBHOOK_SECRET); otherwise the path is a 404 like any unknown one.
"""

import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

if TYPE_CHECKING:
    from imgclf.serving.follow import LiveModel

WEBHOOK_PATH = "/v1/webhooks/mlflow"
SECRET_ENV = "IMGCLF_WEBHOOK_SECRET"  # `imgclf serve` and `imgclf webhook register` read it
# MLflow's headers and signature scheme (mlflow.webhooks.constants)
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
TOLERANCE_S = 300  # Standard Webhooks' recommendation: five minutes either way
HEADERS = (DELIVERY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
ALIAS_ENTITY = "model_version_alias"  # its actions: created (set, or moved) and deleted
log = logging.getLogger("imgclf.serving")


class SignatureRefused(Exception):
    """A delivery that is not MLflow's with our secret: the message says what was wrong (never
    the secret, nor the signature that was expected)."""


@dataclass(frozen=True)
class AliasEvent:
    """What a verified delivery says: the entity and action, and the model and alias it names."""

    entity: str
    action: str
    name: str | None
    alias: str | None
    version: str | None


def verify(secret: str, headers, body: bytes, now: float) -> None:
    """Return if `body` with `headers` (a case-insensitive mapping) is a delivery MLflow signed with
    `secret` at most TOLERANCE_S from `now`; SignatureRefused otherwise."""
    values = [headers.get(name) for name in HEADERS]
    missing = [name for name, value in zip(HEADERS, values, strict=True) if not value]
    if missing:
        raise SignatureRefused(f"not a signed MLflow delivery: no {', '.join(missing)} header")
    delivery_id, timestamp, given = values
    if not (timestamp.isascii() and timestamp.isdigit()):
        raise SignatureRefused(f"{TIMESTAMP_HEADER} {timestamp[:40]!r} is not Unix seconds")
    age = now - int(timestamp)
    if abs(age) > TOLERANCE_S:
        when = f"{age:.0f} s old" if age > 0 else f"{-age:.0f} s in the future"
        raise SignatureRefused(f"{TIMESTAMP_HEADER} is {when}, over the {TOLERANCE_S} s allowed")
    expected = _hmac(secret, delivery_id, timestamp, body)
    # Standard Webhooks allow several space-separated signatures (a secret being rotated).
    for candidate in given.split():
        version, _, encoded = candidate.partition(",")
        if version == SIGNATURE_VERSION and hmac.compare_digest(_base64(encoded), expected):
            return
    raise SignatureRefused(f"{SIGNATURE_HEADER} does not match the body and the webhook secret")


def _hmac(secret: str, delivery_id: str, timestamp: str, body: bytes) -> bytes:
    """MLflow's HMAC-SHA256 of a delivery: over `<delivery id>.<timestamp>.<body>`, keyed with the
    secret (UTF-8); the signature header carries it in base64 after `v1,`."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).digest()


def _base64(text: str) -> bytes:
    """The bytes `text` encodes; empty for anything that is not base64, which matches no HMAC."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return b""


def parse_event(body: bytes) -> AliasEvent:
    """The event of a verified delivery; ValueError if the body is not MLflow's JSON envelope."""
    envelope = json.loads(body)
    if not isinstance(envelope, dict) or not isinstance(envelope.get("data"), dict):
        raise ValueError("expected a JSON object with `entity`, `action` and `data`")
    data = envelope["data"]

    def text(value) -> str | None:
        return str(value) if isinstance(value, str | int) else None

    return AliasEvent(
        entity=str(envelope.get("entity", "")),
        action=str(envelope.get("action", "")),
        name=text(data.get("name")),
        alias=text(data.get("alias")),
        version=text(data.get("version")),
    )


class WebhookAnswer(BaseModel):
    polling: bool  # true: the server asks the registry now
    detail: str


def add_webhook_route(api: FastAPI, live: "LiveModel") -> None:
    """The route, for a live model that follows an alias and has a webhook secret."""
    secret, registry = live.webhook_secret, live.registry
    if not (secret and live.following and registry is not None):
        raise ValueError("an MLflow webhook needs a followed alias and a secret")

    @api.post(
        WEBHOOK_PATH,
        response_model=WebhookAnswer,
        responses={
            400: {"description": "signed, but not MLflow's JSON envelope"},
            401: {"description": "unsigned, badly signed, or a timestamp too far from now"},
        },
        tags=["registry"],
    )
    async def mlflow_webhook(request: Request) -> dict:
        """An MLflow registry event (a registered webhook's delivery, signed with the shared secret).

        An alias event for the followed model and alias makes the server ask the registry at once
        which version the alias names, and serve it (with the checks of a timed poll); any other
        event is acknowledged and ignored."""
        body = await request.body()
        try:
            verify(secret, request.headers, body, time.time())
        except SignatureRefused as error:
            log.warning("refused an MLflow webhook delivery: %s", error)
            raise HTTPException(401, f"refused: {error}") from None
        try:
            event = parse_event(body)
        except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise HTTPException(400, f"signed, but not an MLflow event: {error}") from None
        kind = f"{event.entity}.{event.action}"
        if event.entity != ALIAS_ENTITY or (event.name, event.alias) != (registry.name, registry.alias):
            return {"polling": False, "detail": f"ignored {kind} for {event.name}@{event.alias}"}
        polling = live.wake()
        moved = "deleted" if event.action == "deleted" else f"to version {event.version}"
        log.info("MLflow webhook: %s@%s %s; asking the registry now", event.name, event.alias, moved)
        return {"polling": polling, "detail": f"{kind}: asking the registry for {registry.uri}"}
