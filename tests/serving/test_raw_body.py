"""POST /v1/predict with one image as the body (`curl --data-binary @x.png -H 'Content-Type: image/png'`)
on a real uvicorn server: the same answers as the multipart form, and the same limits and errors."""

import asyncio
import dataclasses
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from imgclf.serving.app import INLINE_PIXELS, INLINE_SECONDS, create_app
from imgclf.serving.model import ServedModel
from tests.serving.conftest import TOKEN, encode, grey_png, reference_answer, running_server


def post_body(
    client, data, content_type: str | None = "image/png", headers: dict | None = None, **params
) -> httpx.Response:
    """POST the bytes as the body, typed `content_type` (None: no Content-Type)."""
    headers = (headers or {}) | ({} if content_type is None else {"content-type": content_type})
    return client.post("/v1/predict", content=data, headers=headers, params=params)


def digit(digits_splits, index: int = 5) -> np.ndarray:
    return digits_splits["test"][0][index][0]


@pytest.mark.parametrize(
    "content_type, fmt",
    [("image/png", "PNG"), ("image/jpeg", "JPEG"), ("application/octet-stream", "PNG"), ("Image/PNG", "PNG")],
)
def test_an_image_body_gets_the_multipart_answer(client, digits_splits, reference_session, content_type, fmt):
    data = encode(Image.fromarray(digit(digits_splits)), fmt)
    raw = post_body(client, data, content_type)
    form = client.post("/v1/predict", files={"file": ("body", data, content_type)})
    assert raw.status_code == 200, raw.text
    assert raw.json() == form.json()  # same file name, label, index, probabilities
    assert raw.headers["x-model-version"] == form.headers["x-model-version"]
    [answer] = raw.json()["predictions"]
    expected = reference_answer(reference_session, data, digits_splits["card"].input)
    np.testing.assert_allclose(list(answer["probabilities"].values()), expected, rtol=0, atol=1e-6)


def test_the_name_comes_from_x_filename_else_body(client, digits_splits):
    png = grey_png(digit(digits_splits))
    named = post_body(client, png, headers={"x-filename": "scan-0001.png"})
    assert named.json()["predictions"][0]["file"] == "scan-0001.png"
    assert post_body(client, png).json()["predictions"][0]["file"] == "body"


def test_top_k_applies_to_an_image_body(client, digits_splits):
    png = grey_png(digit(digits_splits))
    everything = post_body(client, png).json()["predictions"][0]["probabilities"]
    best = sorted(everything, key=everything.get, reverse=True)[:3]
    top = post_body(client, png, top_k=3).json()["predictions"][0]["probabilities"]
    assert list(top) == best
    refused = post_body(client, png, top_k=0)
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["query", "top_k"]


@pytest.mark.parametrize(
    "data, reason",
    [(b"these are my notes, not an image\n", "not an image"), (b"", "empty")],
)
def test_a_body_that_is_not_an_image_is_400_naming_it(client, data, reason):
    response = post_body(client, data, headers={"x-filename": "notes.png"})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "'notes.png'" in detail and reason in detail


def test_a_truncated_image_body_is_400(client, digits_splits):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)
    response = post_body(client, encode(Image.fromarray(noise))[:2000])
    assert response.status_code == 400
    assert "'body'" in response.json()["detail"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "video/mp4", None])
def test_a_body_of_another_type_is_415_naming_it(client, digits_splits, content_type):
    response = post_body(client, grey_png(digit(digits_splits)), content_type)
    assert response.status_code == 415
    detail = response.json()["detail"]
    assert "\n" not in detail
    assert repr(content_type or "none") in detail
    assert "image/*" in detail and "multipart/form-data" in detail


def test_an_image_body_over_the_limit_is_413(client):
    response = post_body(client, os.urandom(11 * 1024 * 1024))
    assert response.status_code == 413
    assert "over the limit" in response.json()["detail"]


def test_an_image_body_over_the_limit_without_content_length_is_413(client, digits_splits):
    def chunks():
        for _ in range(11):
            yield os.urandom(1024 * 1024)

    response = post_body(client, chunks())
    assert response.status_code == 413
    assert response.json()["detail"]
    assert post_body(client, grey_png(digit(digits_splits))).status_code == 200  # and it carries on


def test_an_image_body_over_the_pixel_limit_is_400(served_model):
    small_limit = dataclasses.replace(served_model, max_pixels=100 * 100)
    with running_server(create_app(small_limit)) as url, httpx.Client(base_url=url) as client:
        over = post_body(client, encode(Image.new("L", (101, 100), 255)))
        assert over.status_code == 400
        assert "'body'" in over.json()["detail"]
        assert post_body(client, encode(Image.new("L", (100, 100), 255))).status_code == 200


def test_the_token_guards_an_image_body(secured_url, digits_splits):
    png = grey_png(digit(digits_splits))
    with httpx.Client(base_url=secured_url) as client:
        anonymous = post_body(client, png)
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"] == "Bearer"
        allowed = post_body(client, png, headers={"authorization": f"Bearer {TOKEN}"})
        assert allowed.status_code == 200


def test_image_bodies_share_the_decode_slots(served_model, digits_splits):
    lock = threading.Lock()
    decoding = {"now": 0, "most": 0}

    class SlowDecodes(ServedModel):
        """Counts the decodes in flight; each lasts long enough for the others to overlap it."""

        def decode(self, data, max_pixels=None):
            with lock:
                decoding["now"] += 1
                decoding["most"] = max(decoding["most"], decoding["now"])
            time.sleep(0.05)
            with lock:
                decoding["now"] -= 1
            return super().decode(data, max_pixels)

    slow = SlowDecodes(**{f.name: getattr(served_model, f.name) for f in dataclasses.fields(served_model)})
    # Above the inline limit, so decoded in the thread pool, where requests overlap.
    scale = math.isqrt(INLINE_PIXELS) // 8 + 1
    png = grey_png(np.kron(digit(digits_splits), np.ones((scale, scale), np.uint8)))

    def request(url: str) -> int:
        with httpx.Client(base_url=url, timeout=30) as client:
            return post_body(client, png).status_code

    with running_server(create_app(slow, decodes_at_once=2)) as url, ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(request, [url] * 8))
    assert statuses == [200] * 8
    assert decoding["most"] == 2  # 8 requests overlapped, and never more than 2 decoded at once


def test_small_work_runs_on_the_event_loop_and_the_rest_in_the_thread_pool(served_model, digits_splits):
    decoded_on_loop = []

    class Recorded(ServedModel):
        def decode(self, data, max_pixels=None):
            try:
                asyncio.get_running_loop()
                decoded_on_loop.append(True)
            except RuntimeError:  # no loop in this thread: a worker thread
                decoded_on_loop.append(False)
            return super().decode(data, max_pixels)

    class Slow(Recorded):
        def predict(self, images):
            time.sleep(INLINE_SECONDS * 3)
            return super().predict(images)

    fields = {f.name: getattr(served_model, f.name) for f in dataclasses.fields(served_model)}
    small = grey_png(digit(digits_splits))
    side = math.isqrt(INLINE_PIXELS) + 1
    large = encode(Image.new("L", (side, side), 255))
    for model, data, on_loop in [(Recorded(**fields), small, True), (Recorded(**fields), large, False)]:
        for form in (False, True):
            decoded_on_loop.clear()
            with running_server(create_app(model)) as url, httpx.Client(base_url=url, timeout=30) as client:
                if form:
                    response = client.post("/v1/predict", files=[("file", ("a.png", data, "image/png"))] * 2)
                else:
                    response = post_body(client, data)
            assert response.status_code == 200
            assert decoded_on_loop == [on_loop] * (2 if form else 1)
    decoded_on_loop.clear()
    with running_server(create_app(Slow(**fields))) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert post_body(client, small).status_code == 200
    assert decoded_on_loop == [False]  # a model slower than INLINE_SECONDS: never on the event loop


def test_the_openapi_document_describes_both_bodies(client):
    operation = client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]
    bodies = operation["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/octet-stream"} <= set(bodies)
    assert bodies["image/*"]["schema"] == {"type": "string", "format": "binary"}
    headers = [p["name"] for p in operation["parameters"] if p["in"] == "header"]
    assert headers == ["X-Filename"]
