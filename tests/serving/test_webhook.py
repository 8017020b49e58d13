"""MLflow's webhooks move the served champion at once: `imgclf serve --webhook-secret` (or
IMGCLF_WEBHOOK_SECRET) takes signed alias events at POST /v1/webhooks/mlflow, and `imgclf webhook
register` points a tracking server's webhook at it.

Real components throughout. The route's checks run against a real uvicorn server following an
alias in a sqlite registry, with deliveries built as MLflow's delivery code builds them (its own
signing function and header names) and the registry moved first, so that each refused delivery
could have swapped: a correct one sent after it does. The end-to-end test runs a real `mlflow
server` that delivers for real (allowed to post to http://127.0.0.1 by the settings below, in
its own environment only), `imgclf serve --refresh 300` (so a poll cannot explain a swap) and
`imgclf webhook register`, and moves the alias with MLflow's client.
"""

import json
import logging
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from imgclf.serving.app import create_app
from imgclf.serving.follow import LiveModel
from imgclf.serving.webhook import WEBHOOK_PATH
from tests.conftest import REPO, export_model, tool_env, train_digits_network
from tests.serving.conftest import TOKEN, grey_png, running_server
from tests.serving.test_follow import free_port, mlflow_pointed_at, register, served_version, wait_for

NAME = "digits"
URI = f"models:/{NAME}@champion"
SECRET = "webhook-secret-3f9a"
LONG_REFRESH_S = 300.0  # no timed poll within a test: a swap is the webhook's
SWAP_DEADLINE_S = 10.0  # a woken poll: resolve, download and load, on a busy 2-core machine
WEBHOOK_SWAP_S = 1.0  # through a real mlflow server: the alias move to the new version's answer
NOTHING_HAPPENS_S = 1.0  # after a refused delivery: a swap would be done by then (about 0.2 s)
# What lets an `mlflow server` deliver to this machine's test servers: http, and loopback
# addresses (MLflow allows neither by default), and its list of webhooks cached for 1 s, not 60 s.
WEBHOOK_SERVER_ENV = {
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    "MLFLOW_WEBHOOK_CACHE_TTL": "1",
}


def delivery(payload: dict, secret: str = SECRET, **overrides) -> tuple[dict, bytes]:
    """(headers, body) of a delivery as MLflow's delivery code makes one, signed with its own
    function: a JSON envelope, a delivery id, Unix seconds, `v1,<base64 HMAC>`.

    overrides: timestamp (seconds), entity, action; text (signed and sent instead of the envelope);
    body (sent instead of what was signed)."""
    from mlflow.webhooks.constants import (
        WEBHOOK_DELIVERY_ID_HEADER,
        WEBHOOK_SIGNATURE_HEADER,
        WEBHOOK_TIMESTAMP_HEADER,
    )
    from mlflow.webhooks.delivery import _generate_hmac_signature

    envelope = {
        "entity": overrides.get("entity", "model_version_alias"),
        "action": overrides.get("action", "created"),
        "timestamp": datetime.now(UTC).isoformat(),
        "data": payload,
    }
    text = overrides.get("text", json.dumps(envelope))
    delivery_id, timestamp = str(uuid.uuid4()), str(int(overrides.get("timestamp", time.time())))
    headers = {
        "Content-Type": "application/json",
        WEBHOOK_DELIVERY_ID_HEADER: delivery_id,
        WEBHOOK_TIMESTAMP_HEADER: timestamp,
        WEBHOOK_SIGNATURE_HEADER: _generate_hmac_signature(secret, delivery_id, timestamp, text),
    }
    return headers, overrides.get("body", text.encode())


def moved_to(version: str, name: str = NAME, alias: str = "champion") -> dict:
    return {"name": name, "alias": alias, "version": version}


@pytest.fixture(scope="module")
def second_model(digits_splits, tmp_path_factory) -> Path:
    """The digits MLP trained on shifted batches: another version that answers differently."""
    network = train_digits_network(digits_splits, crop_padding=1)
    return export_model(network, tmp_path_factory.mktemp("webhook-v2"), "stretch")


@pytest.fixture(scope="module")
def sqlite_registry(model_path, second_model, tmp_path_factory) -> dict:
    """A sqlite registry with versions 1 and 2 of NAME (a sqlite store delivers no webhooks)."""
    from mlflow import MlflowClient

    from imgclf.tracking.store import prepare_store

    store = f"sqlite:///{tmp_path_factory.mktemp('webhook-registry') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as monkeypatch:
        mlflow_pointed_at(monkeypatch, store)
        prepare_store(store)
        client = MlflowClient(tracking_uri=store, registry_uri=store)
        client.create_registered_model(NAME)
        for model in (model_path, second_model):
            register(client, NAME, model, model.with_suffix(".json"))
    return {"store": store, "client": client}


@pytest.fixture(scope="module")
def digit(digits_splits) -> bytes:
    return grey_png(digits_splits["test"][0][0])


@pytest.fixture
def following(sqlite_registry, monkeypatch):
    """A server (with a bearer token) following champion every 300 s, with the webhook secret;
    champion on version 1 when it starts, then moved to version 2 in the registry. Yields
    (base URL, the LiveModel)."""
    mlflow_pointed_at(monkeypatch, sqlite_registry["store"])
    client = sqlite_registry["client"]
    client.set_registered_model_alias(NAME, "champion", "1")
    live = LiveModel.load(URI, refresh=LONG_REFRESH_S, threads=1, webhook_secret=SECRET)
    assert live.model.version == "1" and live.following
    with running_server(create_app(live, token=TOKEN)) as url, live:
        client.set_registered_model_alias(NAME, "champion", "2")
        yield url, live


def post(url: str, headers: dict, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}{WEBHOOK_PATH}", headers=headers, content=body, timeout=30)


def assert_still_version_1(url: str, live: LiveModel, digit: bytes) -> None:
    time.sleep(NOTHING_HAPPENS_S)
    assert live.model.version == "1" and live.swaps == 0
    auth = {"Authorization": f"Bearer {TOKEN}"}
    answer = httpx.post(f"{url}/v1/predict", files={"file": ("d.png", digit, "image/png")}, headers=auth)
    assert answer.status_code == 200 and answer.headers["x-model-version"] == "1"


def assert_a_signed_event_swaps(url: str, live: LiveModel) -> None:
    """The control: the registry did move, and a correct delivery makes the server serve it."""
    answer = post(url, *delivery(moved_to("2")))
    assert answer.status_code == 200, answer.text
    assert answer.json()["polling"] is True
    wait_for(lambda: live.model.version == "2", SWAP_DEADLINE_S, "version 2 after a signed event")
    assert live.swaps == 1


def unsigned() -> tuple[dict, bytes]:
    headers, body = delivery(moved_to("2"))
    return {k: v for k, v in headers.items() if k != "X-MLflow-Signature"}, body


def tampered() -> tuple[dict, bytes]:
    headers, body = delivery(moved_to("2"))
    return headers, body.replace(b'"version": "2"', b'"version": "1"')


REFUSED = {
    "unsigned": unsigned,
    "no headers at all": lambda: ({"Content-Type": "application/json"}, delivery(moved_to("2"))[1]),
    "another secret": lambda: delivery(moved_to("2"), secret=SECRET + "x"),
    "body changed after signing": tampered,
    "stale timestamp": lambda: delivery(moved_to("2"), timestamp=time.time() - 301),
    "timestamp in the future": lambda: delivery(moved_to("2"), timestamp=time.time() + 301),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_delivery_not_signed_with_the_secret_is_401_and_swaps_nothing(following, digit, caplog, case):
    url, live = following
    caplog.set_level(logging.INFO, logger="imgclf.serving")
    answer = post(url, *REFUSED[case]())
    assert answer.status_code == 401, answer.text
    assert answer.json()["detail"].startswith("refused: ") and SECRET not in answer.text
    assert_still_version_1(url, live, digit)
    lines = [r.getMessage() for r in caplog.records if r.name == "imgclf.serving"]
    assert any(line.startswith("refused an MLflow webhook delivery: ") for line in lines), lines
    assert not any(SECRET in line for line in lines)  # the secret is never logged
    assert_a_signed_event_swaps(url, live)


IGNORED = {
    "another model": (moved_to("2", name="other-model"), {}),
    "another alias": (moved_to("2", alias="challenger"), {}),
    "not an alias event": (
        {"name": NAME, "version": "2", "source": "models:/m-1"},
        {"entity": "model_version"},
    ),
}


@pytest.mark.parametrize("case", IGNORED)
def test_a_signed_event_for_another_model_or_alias_is_acknowledged_and_ignored(following, digit, case):
    url, live = following
    payload, overrides = IGNORED[case]
    answer = post(url, *delivery(payload, **overrides))
    assert answer.status_code == 200, answer.text
    assert answer.json()["polling"] is False and answer.json()["detail"].startswith("ignored ")
    assert_still_version_1(url, live, digit)
    assert_a_signed_event_swaps(url, live)


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"entity": "model_version_alias"}'])
def test_a_signed_body_that_is_not_an_mlflow_event_is_400(following, text):
    url, live = following
    answer = post(url, *delivery({}, text=text))
    assert answer.status_code == 400 and "not an MLflow event" in answer.json()["detail"]
    assert live.swaps == 0


def test_the_served_alias_deleted_keeps_the_version_serving(following, sqlite_registry, digit):
    url, live = following
    sqlite_registry["client"].delete_registered_model_alias(NAME, "champion")
    answer = post(url, *delivery({"name": NAME, "alias": "champion"}, action="deleted"))
    assert answer.status_code == 200 and answer.json()["polling"] is True
    wait_for(lambda: live.poll_failures == 1, SWAP_DEADLINE_S, "a poll that finds no champion")
    assert_still_version_1(url, live, digit)


def test_the_webhook_needs_no_bearer_token_but_the_rest_of_v1_still_does(following):
    url, _ = following
    assert httpx.get(f"{url}/v1/model").status_code == 401
    assert post(url, *delivery(moved_to("2", name="other-model"))).status_code == 200


@pytest.mark.parametrize(
    "model, refresh, secret",
    [(URI, LONG_REFRESH_S, None), (f"models:/{NAME}/1", LONG_REFRESH_S, SECRET), (URI, 0.0, SECRET)],
    ids=["no-secret", "a-fixed-version", "refresh-0"],
)
def test_the_route_exists_only_when_following_an_alias_with_a_secret(
    sqlite_registry, monkeypatch, model, refresh, secret
):
    mlflow_pointed_at(monkeypatch, sqlite_registry["store"])
    sqlite_registry["client"].set_registered_model_alias(NAME, "champion", "1")
    live = LiveModel.load(model, refresh=refresh, threads=1, webhook_secret=secret)
    with running_server(create_app(live)) as url, live:
        assert post(url, *delivery(moved_to("2"))).status_code == 404
        assert WEBHOOK_PATH not in httpx.get(f"{url}/openapi.json").json()["paths"]


# --- the command line -----------------------------------------------------------------------


def imgclf(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    base = {k: v for k, v in tool_env(REPO).items() if k != "IMGCLF_WEBHOOK_SECRET"}
    command = [sys.executable, "-c", "from imgclf.cli import main; main()", *args]
    return subprocess.run(
        command, cwd=cwd, env=base | (env or {}), capture_output=True, text=True, timeout=300
    )


def test_webhook_secret_needs_an_alias_to_follow():
    from imgclf.cli import build_parser, cmd_serve
    from imgclf.errors import ConfigError

    for model, extra in [("model.onnx", []), (f"models:/{NAME}/1", []), (URI, ["--refresh", "0"])]:
        args = build_parser().parse_args(["serve", "--model", model, "--webhook-secret", "s", *extra])
        with pytest.raises(ConfigError, match=r"^--webhook-secret: .* needs --model models:/<name>@<alias>"):
            cmd_serve(args)


@pytest.mark.parametrize(
    "args, env, message",
    [
        (
            ["--url", "http://127.0.0.1:8000/v1/webhooks/mlflow"],
            {},
            "no webhook secret: set IMGCLF_WEBHOOK_SECRET",
        ),
        (
            ["--url", "ftp://host/hook"],
            {"IMGCLF_WEBHOOK_SECRET": SECRET},
            "--url 'ftp://host/hook': expected",
        ),
        (
            ["--url", "http://127.0.0.1:8000/v1/webhooks/mlflow"],
            {"IMGCLF_WEBHOOK_SECRET": SECRET, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"},
            "the store is sqlite:///mlflow.db: only an `mlflow server` sends webhooks",
        ),
    ],
    ids=["no-secret", "not-http", "a-sqlite-store"],
)
def test_webhook_register_usage_errors_are_one_line_and_exit_2(tmp_path, args, env, message):
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"} | env
    done = imgclf("webhook", "register", *args, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"imgclf: error: {message}"), done.stderr


def test_webhook_list_against_an_unreachable_server_is_one_line_and_exit_1(tmp_path):
    store = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = imgclf(
        "webhook",
        "list",
        env={"MLFLOW_TRACKING_URI": store, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(
        f"imgclf: error: the mlflow server at {store}: "
    )
    assert "Connection refused" in done.stderr


# --- end to end: a real mlflow server delivers ------------------------------------------------


@pytest.fixture(scope="module")
def webhook_server(tmp_path_factory) -> str:
    """A real `mlflow server` that may deliver webhooks to 127.0.0.1 (WEBHOOK_SERVER_ENV)."""
    from tests.support.servers import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("webhook-mlflow-server"), env=WEBHOOK_SERVER_ENV) as url:
        yield url


def predicted_version(client: httpx.Client, digit: bytes) -> str:
    answer = client.post("/v1/predict", files={"file": ("d.png", digit, "image/png")})
    assert answer.status_code == 200, answer.text
    return answer.headers["x-model-version"]


@pytest.mark.e2e
@pytest.mark.slow
def test_an_alias_move_is_served_within_a_second_through_mlflow_webhooks(
    webhook_server, model_path, second_model, digit, monkeypatch, tmp_path
):
    from mlflow import MlflowClient

    mlflow_pointed_at(monkeypatch, webhook_server)
    client = MlflowClient(tracking_uri=webhook_server, registry_uri=webhook_server)
    client.create_registered_model(NAME)
    for model in (model_path, second_model):
        register(client, NAME, model, model.with_suffix(".json"))
    client.set_registered_model_alias(NAME, "champion", "1")
    client.create_registered_model("other-model")
    register(client, "other-model", model_path)

    port = free_port()
    hook = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
    env = {"MLFLOW_TRACKING_URI": webhook_server, "IMGCLF_WEBHOOK_SECRET": SECRET}
    env |= {"XDG_CACHE_HOME": str(tmp_path / "cache")}  # the server downloads each version itself
    command = ["imgclf", "serve", "--model", URI, "--refresh", str(LONG_REFRESH_S), "--port", str(port)]
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            command, cwd=tmp_path, env=tool_env(REPO) | env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: "Uvicorn running" in log.read_text(), 60, f"the server on {url}")
        first = log.read_text().splitlines()[0]
        assert first.endswith(f"following {URI} every 300 s and on MLflow's webhooks at {hook})"), first

        registered = imgclf("webhook", "register", "--url", hook, env=env, cwd=tmp_path)
        assert registered.returncode == 0, registered.stderr
        assert registered.stdout.startswith(f"registered webhook imgclf-127.0.0.1-{port} (")
        again = imgclf("webhook", "register", "--url", hook, env=env, cwd=tmp_path)
        assert again.returncode == 0 and again.stdout.startswith("updated webhook "), again.stderr
        listed = imgclf("webhook", "list", "--json", env=env, cwd=tmp_path)
        hooks = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [h["url"] for h in hooks] == [hook]  # registering again did not add a second
        assert sorted(hooks[0]["events"]) == ["model_version_alias.created", "model_version_alias.deleted"]
        tested = imgclf("webhook", "test", "--url", hook, env=env, cwd=tmp_path)
        assert tested.returncode == 0 and tested.stdout.strip().endswith("HTTP 200"), tested.stderr
        time.sleep(1.5)  # past the server's cache of webhooks (MLFLOW_WEBHOOK_CACHE_TTL=1)

        with httpx.Client(base_url=url, timeout=30) as http:
            assert predicted_version(http, digit) == "1"
            client.set_registered_model_alias("other-model", "champion", "1")  # delivered, and ignored
            for version in ("2", "1"):
                moved = time.monotonic()
                client.set_registered_model_alias(NAME, "champion", version)
                answers = lambda v=version: predicted_version(http, digit) == v  # noqa: E731
                wait_for(answers, WEBHOOK_SWAP_S, f"version {version} answering after the move")
                assert time.monotonic() - moved < WEBHOOK_SWAP_S
            assert served_version(http) == "1"
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
        deleted = imgclf("webhook", "delete", "--url", hook, env=env, cwd=tmp_path)
    assert code == 0, log.read_text()
    text = log.read_text()
    assert f"now serving version 2 of {URI} (was version 1)" in text
    assert f"now serving version 1 of {URI} (was version 2)" in text
    assert text.count("now serving version") == 2  # the other model's event swapped nothing
    assert "refused an MLflow webhook delivery" not in text  # MLflow's signature checks out
    assert deleted.returncode == 0 and deleted.stdout.strip() == f"deleted 1 webhook with the URL {hook}"
