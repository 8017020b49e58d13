"""The drift monitor of `imgclf serve` on a real uvicorn server: in-distribution traffic raises no
alarm, inverted digits raise one that names the signal, on /v1/monitor and /metrics."""

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from imgclf.drift.reference import SIGNALS
from imgclf.serving.app import create_app
from imgclf.serving.model import ServedModel
from tests.serving.conftest import TOKEN, encode, grey_png, running_server

WINDOW = 100
PER_REQUEST = 20


def send(client: httpx.Client, images: np.ndarray) -> None:
    """The images as 8x8 PNG uploads, PER_REQUEST to a request."""
    for start in range(0, len(images), PER_REQUEST):
        files = [
            ("file", (f"{i}.png", grey_png(pixels), "image/png"))
            for i, pixels in enumerate(images[start : start + PER_REQUEST])
        ]
        response = client.post("/v1/predict", files=files)
        assert response.status_code == 200, response.text


def samples(text: str) -> dict[tuple[str, str], float]:
    """(sample name, signal label) -> value of the imgclf_drift_* samples in /metrics."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("imgclf_drift_"):
                found[(sample.name, sample.labels.get("signal", ""))] = sample.value
    return found


@pytest.fixture(scope="module")
def monitored(monitored_model_path):
    model = ServedModel.load(str(monitored_model_path), threads=1)
    with (
        running_server(create_app(model, monitor_window=WINDOW)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        yield client


def test_in_distribution_traffic_raises_no_alarm_then_inverted_digits_do(monitored, digits_splits):
    client = monitored
    state = client.get("/v1/monitor").json()
    assert state["active"] and state["status"] == "waiting for the first window"
    assert state["reference"]["split"] == "val" and state["reference"]["images"] == 270
    test_images = digits_splits["test"][0]

    send(client, test_images[: 2 * WINDOW])  # the held-out test split: the reference's distribution
    state = client.get("/v1/monitor").json()
    assert state["windows_total"] == 2
    assert state["status"] == "no drift", state["signals"]
    assert not any(window["alarm"] for window in state["windows"])
    assert set(state["signals"]) == set(SIGNALS)
    metrics = samples(client.get("/metrics").text)
    assert metrics[("imgclf_drift_windows_total", "")] == 2
    for signal in SIGNALS:
        assert metrics[("imgclf_drift_alarm", signal)] == 0
        assert 0 < metrics[("imgclf_drift_p_value", signal)] <= 1
        assert ("imgclf_drift_statistic", signal) in metrics

    send(client, 255 - test_images[:WINDOW])  # dark ink on paper: a model trained without inversion
    state = client.get("/v1/monitor").json()
    assert state["windows_total"] == 3
    assert state["status"] == "drift"
    drifted = {entry["signal"] for entry in state["drift"]}
    assert "brightness" in drifted, state["signals"]
    assert state["signals"]["brightness"]["alarm"] and state["signals"]["brightness"]["p_value"] < 0.0025
    assert state["signals"]["brightness"]["since"] == state["windows"][0]["ended"]
    metrics = samples(client.get("/metrics").text)
    assert metrics[("imgclf_drift_alarm", "brightness")] == 1
    assert metrics[("imgclf_drift_windows_total", "")] == 3

    send(client, test_images[2 * WINDOW - 70 : 2 * WINDOW + 30])  # back to normal: the alarm clears
    assert client.get("/v1/monitor").json()["status"] == "no drift"


def send_resized(client: httpx.Client, images: np.ndarray, width: int, height: int) -> None:
    """The images as greyscale PNG uploads of width x height (nearest-neighbour), one per request."""
    from PIL import Image

    for i, pixels in enumerate(images):
        image = Image.fromarray(pixels.reshape(pixels.shape[-2:])).resize(
            (width, height), Image.Resampling.NEAREST
        )
        png = encode(image)
        response = client.post("/v1/predict", files=[("file", (f"{i}.png", png, "image/png"))])
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("width", "height", "moved", "kept"), [(32, 32, "size", "aspect"), (16, 4, "aspect", "size")]
)
def test_the_uploads_size_and_aspect_before_resizing_are_watched(
    monitored_model_path, digits_splits, width, height, moved, kept
):
    """The reference's uploads are 8x8: larger photos of the same digits, or wider ones of the same
    area, alarm on the upload's size or aspect ratio, named as such."""
    model = ServedModel.load(str(monitored_model_path), threads=1)
    with (
        running_server(create_app(model, monitor_window=WINDOW)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        send_resized(client, digits_splits["test"][0][:WINDOW], width, height)
        state = client.get("/v1/monitor").json()
    assert state["windows_total"] == 1 and state["signals"][moved]["alarm"], state["signals"]
    assert not state["signals"][kept]["alarm"]
    assert moved in {entry["signal"] for entry in state["drift"]}


def test_low_confidence_histogram_on_metrics(monitored, digits_splits):
    send(monitored, digits_splits["test"][0][:PER_REQUEST])
    names = {
        sample.name
        for family in text_string_to_metric_families(monitored.get("/metrics").text)
        for sample in family.samples
    }
    assert {"imgclf_prediction_confidence_bucket", "imgclf_prediction_confidence_count"} <= names


def test_monitor_window_0_turns_it_off(monitored_model_path, digits_splits):
    model = ServedModel.load(str(monitored_model_path), threads=1)
    with (
        running_server(create_app(model, monitor_window=0)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        send(client, 255 - digits_splits["test"][0][:60])
        state = client.get("/v1/monitor").json()
        assert state["active"] is False and state["status"] == "off" and "--monitor-window 0" in state["note"]
        metrics = samples(client.get("/metrics").text)
    assert metrics[("imgclf_drift_windows_total", "")] == 0
    assert all(metrics[("imgclf_drift_alarm", signal)] == 0 for signal in SIGNALS)


def test_a_model_without_reference_is_not_watched_and_says_why(served_model, digits_splits, caplog):
    app = create_app(served_model, monitor_window=10)
    with (
        caplog.at_level("WARNING", logger="imgclf.serving"),
        running_server(app) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        send(client, digits_splits["test"][0][:40])
        state = client.get("/v1/monitor").json()
    assert state["active"] is False and "no drift reference" in state["note"]
    assert state["windows_total"] == 0
    assert sum("no drift reference" in record.getMessage() for record in caplog.records) == 1


def test_monitor_needs_the_token_as_other_v1_routes(monitored_model_path):
    model = ServedModel.load(str(monitored_model_path), threads=1)
    with running_server(create_app(model, token=TOKEN)) as url:
        assert httpx.get(f"{url}/v1/monitor").status_code == 401
        answer = httpx.get(f"{url}/v1/monitor", headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 200 and answer.json()["window"] == 200


def test_a_swap_starts_a_new_window_against_the_new_models_reference(monitored_model_path, digits_splits):
    from imgclf.serving.follow import LiveModel

    first = ServedModel.load(str(monitored_model_path), threads=1)
    live = LiveModel(first)
    with (
        running_server(create_app(live, monitor_window=WINDOW)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        send(client, 255 - digits_splits["test"][0][: WINDOW - 20])  # most of a window, then a swap
        live.model = ServedModel.load(str(monitored_model_path), threads=1)  # what serving.follow does
        send(client, digits_splits["test"][0][:WINDOW])
        state = client.get("/v1/monitor").json()
    assert state["windows_total"] == 1 and state["status"] == "no drift"  # no inverted image in it
    assert state["images_in_window"] == 0


def test_the_web_page_shows_the_drift_in_one_line(browser, monitored_model_path, digits_splits):
    from tests.serving.test_browser import wait_for_text

    model = ServedModel.load(str(monitored_model_path), threads=1)
    with (
        running_server(create_app(model, monitor_window=WINDOW)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        browser.get(url + "/")
        assert wait_for_text(browser, "model-drift", lambda text: text.startswith("no drift")) == (
            f"no drift (first window: 0 of {WINDOW} images)"
        )
        send(client, 255 - digits_splits["test"][0][:WINDOW])
        browser.get(url + "/")
        line = wait_for_text(browser, "model-drift", lambda text: text.startswith("drift"))
    assert line.startswith("drift in ") and "brightness since " in line
