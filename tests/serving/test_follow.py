"""Serving follows the champion: `imgclf serve --model models:/<name>@champion --refresh SECONDS`
swaps to the version the alias moves to without a restart, and refuses a version it cannot serve.

Real components throughout: an MLflow store (sqlite in tmp_path; a real `mlflow server` in the
e2e test) holding versions registered as the pipeline registers them, the real digits model and
a second one trained differently, a real uvicorn server, and clients sending real HTTP requests
while the alias moves.
"""

import hashlib
import logging
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from imgclf.serving.app import create_app
from imgclf.serving.follow import LiveModel
from imgclf.serving.model import Registry
from tests.conftest import REPO, compose_config, export_model, make_card, tool_env, train_digits_network
from tests.serving.conftest import grey_png, running_server
from tests.serving.test_browser import upload, wait_for_text

NAME = "digits"
URI = f"models:/{NAME}@champion"
REFRESH_S = 0.5
SWAP_DEADLINE_S = 10 * REFRESH_S  # poll, download and load, on a busy 2-core machine
CLIENTS = 4


# --- a registry with four versions: 1 and 2 servable, 3 another input, 4 not ONNX -----------


def register(client, name: str, model: Path, sidecar: Path | None = None) -> str:
    """A version as the pipeline makes one: the ONNX logged as an MLflow model in a run (with the
    export's model.json beside it), then a registry version made from the logged model."""
    import mlflow
    import mlflow.onnx
    import onnx

    with mlflow.start_run(experiment_id="0") as run:
        info = mlflow.onnx.log_model(onnx.load(model), name="model", save_as_external_data=False)
        if sidecar:
            mlflow.log_artifact(str(sidecar))
    version = client.create_model_version(
        name, source=f"models:/{info.model_id}", run_id=run.info.run_id, model_id=info.model_id
    )
    return str(version.version)


def register_file(client, name: str, file: Path) -> str:
    """A version whose artifact is `file` as it is, bypassing the ONNX flavour (a broken upload)."""
    import mlflow

    with mlflow.start_run(experiment_id="0") as run:
        mlflow.log_artifact(str(file), artifact_path="model")
    version = client.create_model_version(
        name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    return str(version.version)


def mlflow_pointed_at(monkeypatch, store: str) -> None:
    """MLflow's fluent API and imgclf both on `store`, restored afterwards: mlflow caches the
    process-wide tracking URI in a module global, which the environment alone does not reset."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setattr(utils, "_tracking_uri", None)


@pytest.fixture(scope="module")
def second_model(digits_splits, tmp_path_factory) -> Path:
    """The digits MLP trained with shifted batches: other weights, other probabilities; exported to
    centre-crop, which a swap allows (resize is not part of the input contract)."""
    return export_model(
        train_digits_network(digits_splits, crop_padding=1), tmp_path_factory.mktemp("v2"), "crop"
    )


@pytest.fixture(scope="module")
def other_input_model(tmp_path_factory) -> Path:
    """A valid imgclf model for 16x16 greyscale images: another input spec."""
    import torch

    from imgclf.models import build_model
    from imgclf.stages.export import Probabilities

    card = make_card((1, 16, 16))
    torch.manual_seed(0)
    net = Probabilities(build_model(compose_config("model.hidden=[16]").model, card)).eval()
    example = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    return export_model((net, example, card), tmp_path_factory.mktemp("v3"), "stretch")


def build_registry(store: str, name: str, model_path, second_model, other_input_model, folder: Path) -> dict:
    from mlflow import MlflowClient

    from imgclf.tracking.store import prepare_store

    prepare_store(store)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    client.create_registered_model(name)
    broken = folder / "model.onnx"
    broken.write_bytes(b"\x08\x07 not a protobuf of an ONNX model")
    versions = {
        "good": register(client, name, model_path, model_path.with_suffix(".json")),
        "second": register(client, name, second_model, second_model.with_suffix(".json")),
        "other_input": register(client, name, other_input_model),
        "broken": register_file(client, name, broken),
    }
    assert list(versions.values()) == ["1", "2", "3", "4"]
    client.set_registered_model_alias(name, "champion", "1")
    return {"client": client, "files": {"1": model_path, "2": second_model}}


@pytest.fixture(scope="module")
def sqlite_registry(model_path, second_model, other_input_model, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("follow-registry")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as monkeypatch:
        mlflow_pointed_at(monkeypatch, store)
        registry = build_registry(store, NAME, model_path, second_model, other_input_model, folder)
    return {"store": store, **registry}


@pytest.fixture
def registry(sqlite_registry, monkeypatch) -> dict:
    """The sqlite registry, `champion` on version 1, and this process pointed at it."""
    mlflow_pointed_at(monkeypatch, sqlite_registry["store"])
    sqlite_registry["client"].set_registered_model_alias(NAME, "champion", "1")
    return sqlite_registry


@pytest.fixture
def no_poller_left():
    yield
    assert not [t for t in threading.enumerate() if t.name == "imgclf-follow"], "a poller outlived its server"


# --- helpers ---------------------------------------------------------------------------------


def references(files: dict, images: np.ndarray) -> dict:
    """Each version's probabilities for `images`, from a plain ONNX Runtime session on its file."""
    import onnxruntime as ort

    return {
        version: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"image": images}
        )[0]
        for version, path in files.items()
    }


def samples(text: str) -> dict:
    """Prometheus text -> {(name, ((label, value), ...)): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_for(condition, deadline_s: float, what: str) -> float:
    """Poll `condition` until it is true; the seconds it took, or fail saying `what` never happened."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > deadline_s:
            raise AssertionError(f"{what}: not within {deadline_s} s")
        time.sleep(0.05)
    return time.monotonic() - started


def probabilities(response: httpx.Response) -> list[float] | None:
    """The first prediction's probabilities in class order; None for a failed request."""
    if response.status_code != 200:
        return None
    answer = response.json()["predictions"][0]["probabilities"]
    return [answer[str(c)] for c in range(10)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def served_version(client: httpx.Client) -> str:
    return client.get("/v1/model").json()["version"]


def swap_under_load(uri: str, alias_client, name: str, files: dict, images: np.ndarray) -> None:
    """Serve `uri` (version 1) under CLIENTS clients, move champion to version 2, check every answer."""
    pngs = [grey_png(image) for image in images]
    expected = references(files, images)
    assert np.abs(expected["1"] - expected["2"]).max() > 0.01  # the versions answer differently
    answers = []  # (sent at, image index, status, version header, probabilities)
    stop = threading.Event()

    def send(url: str, first: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            index = first
            while not stop.is_set():
                sent = time.monotonic()
                response = client.post("/v1/predict", files={"file": ("digit.png", pngs[index], "image/png")})
                version = response.headers.get("x-model-version")
                answers.append((sent, index, response.status_code, version, probabilities(response)))
                index = (index + CLIENTS) % len(pngs)

    live = LiveModel.load(uri, refresh=REFRESH_S, threads=1)
    assert live.model.version == "1" and live.following
    with running_server(create_app(live)) as url, live, httpx.Client(base_url=url, timeout=30) as client:
        senders = [threading.Thread(target=send, args=(url, k)) for k in range(CLIENTS)]
        for sender in senders:
            sender.start()
        try:
            wait_for(lambda: len(answers) >= 4 * CLIENTS, 30, "answers from version 1")
            alias_client.set_registered_model_alias(name, "champion", "2")
            wait_for(lambda: served_version(client) == "2", SWAP_DEADLINE_S, "/v1/model reports version 2")
            swapped = time.monotonic()
            wait_for(
                lambda: sum(sent > swapped for sent, *_ in answers) >= 4 * CLIENTS, 30, "answers after it"
            )
        finally:
            stop.set()
            for sender in senders:
                sender.join(timeout=30)
        card = client.get("/v1/model").json()
        metrics = samples(client.get("/metrics").text)

    assert all(status == 200 for _, _, status, _, _ in answers), {status for _, _, status, _, _ in answers}
    for sent, index, _, version, answered in answers:
        # Each answer comes whole from the version its header names, before and during the swap.
        np.testing.assert_allclose(answered, expected[version][index], atol=1e-5)
        if sent > swapped:
            assert version == "2"
    assert {version for *_, version, _ in answers} == {"1", "2"}
    assert card["version"] == "2" and card["registry"]["alias"] == "champion" and card["source"] == uri
    assert card["sha256"] == hashlib.sha256(files["2"].read_bytes()).hexdigest()
    assert card["input"]["resize"] == "crop"  # version 2's own preprocessing now
    info = {
        dict(labels)["version"]: v for (metric, labels), v in metrics.items() if metric == "imgclf_model_info"
    }
    assert info == {"2": 1.0}  # only the version served now
    assert metrics[("imgclf_model_swaps_total", ())] == 1
    assert metrics[("imgclf_model_refused_versions_total", ())] == 0
    predicted = sum(v for (metric, _), v in metrics.items() if metric == "imgclf_predictions_total")
    assert predicted == len(answers)  # counted on, across the swap


# --- the tests -------------------------------------------------------------------------------


def test_the_server_swaps_to_the_new_champion_under_load(registry, digits_splits, no_poller_left):
    swap_under_load(URI, registry["client"], NAME, registry["files"], digits_splits["test"][0][:40])


@pytest.mark.parametrize(
    "version, why",
    [("3", r"its input \(L uint8 NCHW \[batch, 1, 16, 16\]\) differs"), ("4", "not an ONNX model")],
    ids=["another-input", "not-onnx"],
)
def test_a_version_it_cannot_serve_is_refused_once_and_the_old_one_keeps_answering(
    registry, digits_splits, caplog, no_poller_left, version, why
):
    caplog.set_level(logging.INFO, logger="imgclf.serving")
    image = digits_splits["test"][0][:1]
    expected = references(registry["files"], image)
    live = LiveModel.load(URI, refresh=REFRESH_S / 2, threads=1)
    with running_server(create_app(live)) as url, live, httpx.Client(base_url=url, timeout=30) as client:
        registry["client"].set_registered_model_alias(NAME, "champion", version)
        wait_for(lambda: version in live.refused, SWAP_DEADLINE_S, f"version {version} refused")
        time.sleep(6 * live.refresh)  # polls that must not load it again
        response = client.post("/v1/predict", files={"file": ("d.png", grey_png(image[0]), "image/png")})
        assert response.status_code == 200 and response.headers["x-model-version"] == "1"
        np.testing.assert_allclose(probabilities(response), expected["1"][0], atol=1e-5)
        assert served_version(client) == "1"
        metrics = samples(client.get("/metrics").text)
        assert metrics[("imgclf_model_refused_versions_total", ())] == 1
        assert metrics[("imgclf_model_swaps_total", ())] == 0
        # A later, different version is tried, and taken.
        registry["client"].set_registered_model_alias(NAME, "champion", "2")
        wait_for(lambda: served_version(client) == "2", SWAP_DEADLINE_S, "version 2 after the refused one")
    refusals = [r for r in caplog.records if r.name == "imgclf.serving" and "refused" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]  # once, not at every poll
    line = refusals[0].getMessage()
    assert f"refused version {version} of {URI}, still serving version 1: " in line and "\n" not in line
    assert refusals[0].levelno == logging.WARNING
    assert re.search(why, line), line


def test_an_unreachable_store_is_logged_once_and_the_model_keeps_serving(served_model, monkeypatch, caplog):
    port = free_port()  # nothing listens on it
    mlflow_pointed_at(monkeypatch, f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    caplog.set_level(logging.INFO, logger="imgclf.serving")
    live = LiveModel(served_model, Registry(URI), refresh=REFRESH_S)
    for _ in range(3):
        live.poll()
    assert live.model is served_model and live.poll_failures == 3 and not live.refused
    lines = [r.getMessage() for r in caplog.records if r.name == "imgclf.serving"]
    assert len(lines) == 1, lines  # one line for the outage, not one per poll
    assert lines[0].startswith(f"cannot poll the registry, still serving version {served_model.version}: ")
    assert f"127.0.0.1:{port}" in lines[0] and "\n" not in lines[0]


@pytest.mark.parametrize("uri", [f"models:/{NAME}/1", "file"])
def test_only_an_alias_is_followed(registry, model_path, no_poller_left, uri):
    uri = str(model_path) if uri == "file" else uri
    live = LiveModel.load(uri, refresh=REFRESH_S)
    assert not live.following
    with live:
        assert not [t for t in threading.enumerate() if t.name == "imgclf-follow"]
    assert not LiveModel.load(URI, refresh=0).following  # 0: never


def test_imgclf_serve_follows_the_alias_and_stops_cleanly(registry, tmp_path):
    """The command line end to end: the startup line, a swap in the server's log, a clean exit."""
    port = free_port()
    command = ["imgclf", "serve", "--model", URI, "--refresh", str(REFRESH_S), "--port", str(port)]
    env = tool_env(REPO) | {"MLFLOW_TRACKING_URI": registry["store"]}
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: "Uvicorn running" in log.read_text(), 60, f"the server on {url}")
        first = log.read_text().splitlines()[0]
        assert first.startswith("imgclf: serving digits-test version 1 on ")
        assert first.endswith(f"(no token, following {URI} every {REFRESH_S:g} s)")
        registry["client"].set_registered_model_alias(NAME, "champion", "2")
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_for(lambda: served_version(client) == "2", SWAP_DEADLINE_S, "/v1/model reports version 2")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
    assert code == 0, log.read_text()
    assert f"now serving version 2 of {URI} (was version 1)" in log.read_text()


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_refresh_must_be_a_number_of_seconds(value):
    from imgclf.cli import build_parser, cmd_serve
    from imgclf.errors import ConfigError

    args = build_parser().parse_args(["serve", "--model", "model.onnx", "--refresh", value])
    with pytest.raises(ConfigError, match=rf"--refresh {value}\S*: expected seconds"):
        cmd_serve(args)


@pytest.mark.e2e
def test_the_swap_works_through_an_mlflow_server(
    mlflow_server,
    model_path,
    second_model,
    other_input_model,
    digits_splits,
    tmp_path,
    monkeypatch,
    no_poller_left,
):
    name = f"follow-{tmp_path.name}"  # the server is shared by the whole session
    mlflow_pointed_at(monkeypatch, mlflow_server)
    registry = build_registry(mlflow_server, name, model_path, second_model, other_input_model, tmp_path)
    swap_under_load(
        f"models:/{name}@champion", registry["client"], name, registry["files"], digits_splits["test"][0][:40]
    )


@pytest.mark.e2e
def test_the_web_page_shows_the_version_that_answers_after_a_swap(
    registry,
    browser,
    digits_splits,
    tmp_path,
    no_poller_left,
):
    from selenium.webdriver.common.by import By

    digit = tmp_path / "digit.png"
    digit.write_bytes(grey_png(digits_splits["test"][0][0]))
    live = LiveModel.load(URI, refresh=REFRESH_S)
    with running_server(create_app(live)) as url, live, httpx.Client(base_url=url, timeout=30) as client:
        browser.get(f"{url}/")
        wait_for_text(browser, "model-version", lambda text: text == "1 @champion")
        registry["client"].set_registered_model_alias(NAME, "champion", "2")
        wait_for(lambda: served_version(client) == "2", SWAP_DEADLINE_S, "/v1/model reports version 2")
        upload(browser, digit)  # answered by version 2: the page reloads its card without a reload
        wait_for_text(browser, "model-version", lambda text: text == "2 @champion")
        answer = client.post("/v1/predict", files={"file": ("d.png", digit.read_bytes(), "image/png")}).json()
        assert browser.find_element(By.ID, "label").text == answer["predictions"][0]["label"]
