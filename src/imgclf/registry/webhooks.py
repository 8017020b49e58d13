"""MLflow webhooks that tell `imgclf serve` when an alias moves: `imgclf webhook register|list|delete|test`.

An `mlflow server` posts registry events to the URLs registered with it, signed with each
webhook's secret (serving.webhook checks them). Only a server delivers: a sqlite store keeps no
one to send them, so these commands need MLFLOW_TRACKING_URI (or tracking.uri) to be the server's
http(s) URL. A webhook here is known by its URL: registering a URL again updates that webhook
(its name, events, secret, and ACTIVE) instead of adding a second that would deliver twice.

The server checks the URL when it is registered, and again at each delivery: by default it sends
to public https:// addresses only (MLFLOW_WEBHOOK_ALLOWED_SCHEMES, MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS
in the server's environment; README, Webhooks). It also caches the webhooks of each event for
MLFLOW_WEBHOOK_CACHE_TTL seconds (60), so a new or changed webhook may take that long to be used,
and it encrypts the secrets with MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY, which must stay the same
across its restarts.
"""

import re
import urllib.parse
from dataclasses import dataclass
from functools import cached_property

from imgclf.errors import ConfigError, ImgclfError
from imgclf.serving.model import tracking_uri
from imgclf.serving.webhook import SECRET_ENV

EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
DESCRIPTION = "imgclf serve: alias moves, so that the server swaps at once"
PAGE = 100
SERVER_SETTINGS = (
    "the mlflow server delivers to http:// only with MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https, and to "
    "loopback or private addresses only with MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true, in its environment"
)

# The server encrypts the secrets with this key, else with one it makes at each start: after a
# restart it can read none of them, and answers 500 to any listing of webhooks.
UNREADABLE_SECRETS = (
    "an mlflow server restarted without MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY cannot read the secrets "
    "of the webhooks registered before: README, Webhooks"
)


class WebhookError(ImgclfError):
    """The tracking server did not answer, or answered with an error other than a bad request."""


@dataclass(frozen=True)
class Registration:
    webhook_id: str
    name: str
    url: str
    created: bool  # False: an existing webhook with this URL was updated


class Webhooks:
    """The webhooks of the tracking server that `imgclf serve` reads its registry from."""

    def __init__(self, store: str | None = None):
        self.store = store or tracking_uri()
        if not self.store.startswith(("http://", "https://")):
            raise ConfigError(
                f"the store is {self.store}: only an `mlflow server` sends webhooks; set "
                "MLFLOW_TRACKING_URI to its http(s):// URL"
            )

    @cached_property
    def client(self):
        """MLflow's client, imported on first use: a usage error is reported before that (seconds)."""
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.store, registry_uri=self.store)

    def register(self, url: str, secret: str | None, name: str | None = None) -> Registration:
        """Create the webhook for `url`, or update the one that has it: alias events, signed."""
        check_url(url)
        if not secret:
            raise ConfigError(
                f"no webhook secret: set {SECRET_ENV} (the same value as `imgclf serve` reads) or --secret"
            )
        name = name or default_name(url)
        fields = {"name": name, "events": list(EVENTS), "description": DESCRIPTION, "secret": secret}
        existing = self.matching(url)
        for webhook in existing:
            self._call(self.client.update_webhook, webhook.webhook_id, status="ACTIVE", **fields)
        if existing:
            return Registration(existing[0].webhook_id, name, url, created=False)
        webhook = self._call(self.client.create_webhook, url=url, **fields)
        return Registration(webhook.webhook_id, name, url, created=True)

    def listed(self) -> list:
        """Every webhook of the server (MLflow's `Webhook`s), newest first."""
        found, token = [], None
        while True:
            page = self._call(self.client.list_webhooks, max_results=PAGE, page_token=token)
            found += list(page)
            token = page.token
            if not token:
                return found

    def rows(self) -> list[dict]:
        """`imgclf webhook list`: id, name, url, status and events of each webhook, newest first."""
        return [
            {
                "id": webhook.webhook_id,
                "name": webhook.name,
                "url": webhook.url,
                "status": str(webhook.status),
                "events": [str(event) for event in webhook.events],
            }
            for webhook in self.listed()
        ]

    def matching(self, url: str) -> list:
        return [webhook for webhook in self.listed() if webhook.url == url]

    def delete(self, url: str) -> int:
        """Delete the webhooks with this URL; how many there were."""
        existing = self.matching(url)
        for webhook in existing:
            self._call(self.client.delete_webhook, webhook.webhook_id)
        return len(existing)

    def test(self, url: str) -> str:
        """Have the server deliver an example alias event to `url` now; what came back, in a line.

        The example names MLflow's example model, so a server that follows another one answers
        200 and ignores it: a 200 says the server reached it and the signature matched."""
        existing = self.matching(url)
        if not existing:
            raise ConfigError(f"no webhook has the URL {url}: `imgclf webhook register --url {url}` first")
        result = self._call(self.client.test_webhook, existing[0].webhook_id, EVENTS[0])
        if not result.success:
            answer = f"HTTP {result.response_status}" if result.response_status else "no answer"
            why = " ".join(str(result.error_message or result.response_body or "").split())[:300]
            raise WebhookError(f"the mlflow server's test delivery to {url} failed: {answer}: {why}")
        return f"the mlflow server delivered a test event to {url}: HTTP {result.response_status}"

    def _call(self, method, *args, **kwargs):
        """MLflow's client call; its errors as one line (a bad request: exit 2, else 1)."""
        from mlflow.exceptions import MlflowException

        try:
            return method(*args, **kwargs)
        except MlflowException as error:
            message = " ".join(str(getattr(error, "message", None) or error).split())
            if str(error.error_code) == "INVALID_PARAMETER_VALUE":
                hint = f" ({SERVER_SETTINGS})" if re.search(r"scheme|public", message) else ""
                raise ConfigError(f"the mlflow server at {self.store} refused: {message}{hint}") from None
            hint = f" ({UNREADABLE_SECRETS})" if re.search(r"\b500\b", message) else ""
            raise WebhookError(f"the mlflow server at {self.store}: {message}{hint}") from None


def check_url(url: str) -> None:
    """ConfigError unless `url` is an http(s) URL with a host: where the server is to post."""
    parts = urllib.parse.urlparse(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"--url {url!r}: expected the server's http(s) URL, e.g. https://host:8000/v1/webhooks/mlflow"
        )


def default_name(url: str) -> str:
    """`imgclf-<host>-<port>`, in the characters MLflow allows in a webhook's name."""
    netloc = urllib.parse.urlparse(url).netloc.rpartition("@")[2]
    return ("imgclf-" + re.sub(r"[^A-Za-z0-9._-]+", "-", netloc).strip("-._"))[:62].rstrip("-._")
