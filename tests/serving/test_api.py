"""The HTTP API on a real uvicorn server: answers equal ONNX Runtime and `imgclf predict`, and
every kind of bad input gets a 4xx with a JSON detail, never a 5xx."""

import dataclasses
import json
import math
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from imgclf.card import InputSpec
from imgclf.images import MAX_PIXELS
from imgclf.serving.app import FULL_SIZE_IMAGES_PER_REQUEST, INLINE_PIXELS, MAX_FILES, create_app
from imgclf.serving.limits import DEFAULT_MAX_BODY_BYTES, MIB
from imgclf.serving.model import ServedModel
from tests.conftest import REPO, tool_env
from tests.serving.conftest import (
    TOKEN,
    encode,
    grey_png,
    reference_answer,
    running_server,
    wide_digits,
)

# The served model's input, as the test model's card says; the crop model differs only in resize.
STRETCH = InputSpec("L", (8, 8), "stretch")
CROP = InputSpec("L", (8, 8), "crop")


def post_files(client, *files, **params) -> httpx.Response:
    return client.post("/v1/predict", files=[("file", f) for f in files], params=params)


def probabilities_of(response: httpx.Response, index: int = 0) -> dict[str, float]:
    assert response.status_code == 200, response.text
    return response.json()["predictions"][index]["probabilities"]


def vector(probabilities: dict[str, float]) -> np.ndarray:
    """An answer's probabilities in class order (the order the API lists all classes in)."""
    return np.array(list(probabilities.values()))


def test_health_and_model_card(client, served_model):
    assert client.get("/health").json() == {"status": "ok"}
    card = client.get("/v1/model").json()
    assert card["name"] == "digits-test"  # from the sidecar beside the .onnx
    assert card["version"] == f"sha256:{served_model.sha256[:12]}"
    assert card["classes"] == [str(d) for d in range(10)]
    assert card["input"]["mode"] == "L"
    assert card["input"]["shape"] == ["batch", 1, 8, 8]
    assert card["input"]["resize"] == "stretch"
    assert card["lineage"]["mlflow_run_id"] == "0123456789abcdef"
    assert card["registry"] is None
    assert card["quantization"] == {"scheme": "none"}  # exported before the card said: float32


def test_answers_equal_onnx_runtime_on_the_raw_test_split(client, digits_splits, reference_session):
    images, labels = digits_splits["test"]
    picked = range(0, len(images), 9)  # 30 test images, every digit several times
    expected = reference_session.run(None, {"image": images[list(picked)]})[0]
    correct = 0
    for row, i in enumerate(picked):
        response = post_files(client, (f"test-{i}.png", grey_png(images[i]), "image/png"))
        answer = response.json()["predictions"][0]
        got = np.array([answer["probabilities"][c] for c in digits_splits["card"].classes])
        np.testing.assert_allclose(got, expected[row], rtol=0, atol=1e-6)
        assert answer["index"] == int(expected[row].argmax())
        assert answer["label"] == digits_splits["card"].classes[answer["index"]]
        correct += answer["index"] == labels[i]
    assert correct >= 0.85 * len(picked)  # a trained model, so the comparison means something


def test_answer_equals_imgclf_predict_json(client, model_path, digits_splits, tmp_path):
    images, _ = digits_splits["test"]
    files = []
    for i in (0, 1, 2):
        files.append(tmp_path / f"digit{i}.png")
        files[-1].write_bytes(grey_png(images[i]))
    rgb = tmp_path / "colour.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(rgb)
    files.append(rgb)
    done = subprocess.run(
        ["imgclf", "predict", "--model", str(model_path), "--json", "--threads", "1"]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        env=tool_env(REPO),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    cli = [json.loads(line) for line in done.stdout.splitlines()]
    response = post_files(client, *[(f.name, f.read_bytes()) for f in files])
    api = response.json()["predictions"]
    assert [r["file"] for r in cli] == [str(f) for f in files]
    assert [r["file"] for r in api] == [f.name for f in files]
    for from_cli, from_api in zip(cli, api, strict=True):
        assert {k: v for k, v in from_cli.items() if k != "file"} == {
            k: v for k, v in from_api.items() if k != "file"
        }


def test_many_files_in_one_request_keep_their_order(client, digits_splits):
    images, _ = digits_splits["test"]
    files = [(f"{i}.png", grey_png(images[i]), "image/png") for i in range(5)]
    together = post_files(client, *files).json()["predictions"]
    alone = [post_files(client, f).json()["predictions"][0] for f in files]
    assert [p["file"] for p in together] == [f[0] for f in files]
    assert together == alone


def test_top_k_gives_the_best_classes_first(client, digits_splits):
    image = grey_png(digits_splits["test"][0][3])
    full = probabilities_of(post_files(client, ("a.png", image)))
    top = probabilities_of(post_files(client, ("a.png", image), top_k=3))
    assert list(top) == sorted(full, key=full.get, reverse=True)[:3]
    assert post_files(client, ("a.png", image), top_k=0).status_code == 422


def digit_image(digits_splits, index: int = 5) -> np.ndarray:
    return digits_splits["test"][0][index][0]


def test_transparent_png_is_read_as_on_white(client, digits_splits):
    pixels = digit_image(digits_splits)
    # Ink as opaque black whose strength is the alpha: over white it is exactly `pixels` again.
    alpha = 255 - pixels
    rgba = np.stack([np.zeros_like(pixels)] * 3 + [alpha], axis=-1)
    transparent = encode(Image.fromarray(rgba, "RGBA"))
    grey_on_white = grey_png(pixels)
    got = probabilities_of(post_files(client, ("alpha.png", transparent, "image/png")))
    want = probabilities_of(post_files(client, ("grey.png", grey_on_white, "image/png")))
    np.testing.assert_allclose(list(got.values()), list(want.values()), atol=2e-3)


@pytest.mark.parametrize("kind", ["palette", "sixteen_bit"])
def test_palette_and_16_bit_pngs_decode_to_the_same_pixels(client, digits_splits, kind):
    pixels = digit_image(digits_splits)
    if kind == "palette":
        image = Image.fromarray(pixels, "L").convert("P")  # a grey palette holds each value exactly
    else:
        image = Image.fromarray(pixels.astype(np.uint16) * 257)  # 0..255 -> 0..65535
        assert image.mode.startswith("I;16")
    got = probabilities_of(post_files(client, (f"{kind}.png", encode(image), "image/png")))
    want = probabilities_of(post_files(client, ("grey.png", grey_png(pixels), "image/png")))
    assert got == want


def test_greyscale_jpeg_and_large_colour_photo_are_resized(client, digits_splits, reference_session):
    wide = wide_digits(digits_splits)  # 64x192
    jpeg = encode(Image.fromarray(wide, "L"), "JPEG")
    tinted = np.stack([wide, wide // 4 * 3, wide // 2], axis=-1)  # a tint that keeps the digits in grey
    photo = encode(Image.fromarray(tinted).resize((900, 300), Image.Resampling.NEAREST), "JPEG")
    response = post_files(client, ("grey.jpg", jpeg, "image/jpeg"), ("photo.jpg", photo, "image/jpeg"))
    for index, data in enumerate((jpeg, photo)):
        want = reference_answer(reference_session, data, STRETCH)
        np.testing.assert_allclose(vector(probabilities_of(response, index)), want, rtol=0, atol=1e-6)
        # What a centre crop would give is far from it: the comparison tells the two apart.
        assert np.abs(want - reference_answer(reference_session, data, CROP)).max() > 0.1


@pytest.fixture(scope="module")
def crop_url(crop_model_path):
    with running_server(create_app(ServedModel.load(str(crop_model_path), threads=1))) as url:
        yield url


def test_a_crop_model_classifies_the_centre_of_a_wide_image(crop_url, crop_model_path, client, digits_splits):
    import onnxruntime as ort

    data = grey_png(wide_digits(digits_splits, (0, 5, 9)))
    with httpx.Client(base_url=crop_url) as crop_client:
        assert crop_client.get("/v1/model").json()["input"]["resize"] == "crop"
        cropped = vector(probabilities_of(post_files(crop_client, ("wide.png", data, "image/png"))))
    crop_reference = ort.InferenceSession(str(crop_model_path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(cropped, reference_answer(crop_reference, data, CROP), rtol=0, atol=1e-6)
    stretched = vector(probabilities_of(post_files(client, ("wide.png", data, "image/png"))))
    assert np.abs(cropped - stretched).max() > 0.1
    # The centre is the middle digit: it gets the label that digit gets alone.
    alone = vector(probabilities_of(post_files(client, ("5.png", grey_png(digit_image(digits_splits, 5))))))
    assert cropped.argmax() == alone.argmax()


def bomb_png() -> bytes:
    """A real, decodable 1-bit PNG just over the default limit (10955x10955, 120 megapixels): a
    few tens of kB on the wire."""
    side = math.isqrt(MAX_PIXELS) + 1
    return encode(Image.new("1", (side, side), 1), optimize=True)


BAD_FILES = {
    "bomb": ("bomb.png", bomb_png, "too many pixels"),
    "truncated": (
        "cut.png",
        lambda: encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)))[:2000],
        "truncated",
    ),
    "text named .png": ("notes.png", lambda: b"these are my notes, not an image\n" * 3, "not an image"),
    "empty": ("empty.png", lambda: b"", "empty"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_image_is_400_with_a_detail_naming_the_file(client, kind):
    name, make, reason = BAD_FILES[kind]
    data = make()
    assert len(data) < 1024 * 1024
    response = post_files(client, (name, data, "image/png"))
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert name in detail and reason in detail
    assert "Traceback" not in response.text


def test_one_bad_file_refuses_the_whole_request(client, digits_splits):
    good = ("good.png", grey_png(digit_image(digits_splits)), "image/png")
    response = post_files(client, good, ("bad.png", b"nope", "image/png"))
    assert response.status_code == 400
    assert "bad.png" in response.json()["detail"]


def test_images_over_the_pixel_limit_per_request_are_413(served_model):
    # Small files may decode to large images: the body limit alone does not bound a request's memory.
    small_limit = dataclasses.replace(served_model, max_pixels=100 * 100)
    png = encode(Image.new("L", (100, 100), 255))  # a few hundred bytes, at the per-image limit
    files = [(f"{i}.png", png, "image/png") for i in range(FULL_SIZE_IMAGES_PER_REQUEST + 1)]
    with running_server(create_app(small_limit)) as url, httpx.Client(base_url=url) as client:
        response = post_files(client, *files)
        assert response.status_code == 413
        over = f"{len(files) * 100 * 100} pixels in all, over the limit of {(len(files) - 1) * 100 * 100}"
        assert over in response.json()["detail"]
        assert post_files(client, *files[:-1]).status_code == 200


def test_decodes_in_flight_are_bounded_across_requests(served_model, digits_splits):
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
    large = np.kron(digit_image(digits_splits), np.ones((scale, scale), np.uint8))
    png = ("a.png", grey_png(large), "image/png")

    def request(url: str) -> int:
        with httpx.Client(base_url=url, timeout=30) as client:
            return post_files(client, png, png).status_code

    with running_server(create_app(slow, decodes_at_once=2)) as url, ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(request, [url] * 8))
    assert statuses == [200] * 8
    assert decoding["most"] == 2  # 8 requests overlapped, and never more than 2 decoded at once


def test_body_over_the_limit_is_413(client):
    eleven_mb = os.urandom(11 * 1024 * 1024)
    response = post_files(client, ("big.png", eleven_mb, "image/png"))
    assert response.status_code == 413
    assert "over the limit" in response.json()["detail"]


def test_serve_takes_the_servers_body_limit_unless_told_and_says_so(monkeypatch, capsys):
    from imgclf import cli
    from imgclf.serving import server

    limits = []
    monkeypatch.setattr(server, "serve", lambda model, options: limits.append(options.max_body_bytes))
    cli.main(["serve", "--model", "model.onnx"])
    cli.main(["serve", "--model", "model.onnx", "--max-body-mb", "2.5"])
    assert limits == [DEFAULT_MAX_BODY_BYTES, int(2.5 * MIB)]
    with pytest.raises(SystemExit) as exit:
        cli.main(["serve", "--help"])
    assert exit.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"largest request body, MiB (default {DEFAULT_MAX_BODY_BYTES // MIB}; 413 above)" in help_text


def test_body_over_the_limit_without_content_length_is_413(client):
    """A chunked body declares no size: the limit is counted while the body is read."""
    boundary = "imgclf-boundary"

    def chunks():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        for _ in range(11):
            yield os.urandom(1024 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/v1/predict",
        content=chunks(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 413
    assert response.json()["detail"]
    assert client.get("/health").status_code == 200  # and the server carries on


@pytest.mark.parametrize(
    "content_type, body",
    [("application/json", b'{"file": "x"}'), ("text/plain", b"hi")],
)
def test_request_that_is_neither_multipart_nor_an_image_is_415(client, content_type, body):
    response = client.post("/v1/predict", content=body, headers={"content-type": content_type})
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["detail"]


def test_part_that_is_not_an_image_type_is_415(client, digits_splits):
    response = post_files(client, ("a.txt", grey_png(digit_image(digits_splits)), "text/plain"))
    assert response.status_code == 415
    assert "a.txt" in response.json()["detail"]


def test_missing_file_field_is_422_with_a_detail(client):
    response = client.post("/v1/predict", files={"image": ("a.png", b"x", "image/png")})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "file"]


def test_unknown_route_and_method_are_json(client):
    assert client.get("/v2/nothing").json() == {"detail": "Not Found"}
    assert client.get("/v1/predict").status_code == 405


def test_token_guards_v1_but_not_health_or_page(secured_url, digits_splits):
    image = ("a.png", grey_png(digit_image(digits_splits)), "image/png")
    with httpx.Client(base_url=secured_url) as anonymous:
        for response in (anonymous.get("/v1/model"), post_files(anonymous, image)):
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert "bearer token" in response.json()["detail"]
        wrong = anonymous.get("/v1/model", headers={"Authorization": f"Bearer {TOKEN}x"})
        assert wrong.status_code == 401
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/").status_code == 200
    with httpx.Client(base_url=secured_url, headers={"Authorization": f"Bearer {TOKEN}"}) as allowed:
        assert allowed.get("/v1/model").status_code == 200
        assert post_files(allowed, image).status_code == 200


@pytest.mark.parametrize(
    "authorization, status",
    [
        (f"bearer {TOKEN}", 200),
        (f"BEARER  {TOKEN}", 200),
        (f"bearer {TOKEN}x", 401),
        (f"bearer {TOKEN[:-1]}", 401),
        (f"Basic {TOKEN}", 401),
        (TOKEN, 401),
        (f"Bearer{TOKEN}", 401),
    ],
)
def test_the_bearer_scheme_is_case_insensitive_and_the_token_exact(secured_url, authorization, status):
    with httpx.Client(base_url=secured_url) as client:
        assert client.get("/v1/model", headers={"Authorization": authorization}).status_code == status


def test_web_page_docs_and_openapi_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/health", "/v1/model", "/v1/predict"} <= set(spec["paths"])


def metric(text: str, metric_name: str, **labels) -> float:
    """A sample's value in Prometheus' text format; 0 if the series does not exist yet."""
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name != metric_name:
            continue
        pairs, _, value = rest.rpartition("} ")
        found = dict(pair.split("=", 1) for pair in pairs.split(","))
        if {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    return 0.0


def test_metrics_count_requests_statuses_latency_and_classes(client, digits_splits, served_model):
    before = client.get("/metrics").text
    pixels = digit_image(digits_splits)
    label = post_files(client, ("a.png", grey_png(pixels), "image/png")).json()["predictions"][0]["label"]
    post_files(client, ("a.png", grey_png(pixels), "image/png"))
    post_files(client, ("bad.png", b"nope", "image/png"))
    client.post("/v1/predict", content=b"{}", headers={"content-type": "application/json"})
    after = client.get("/metrics").text

    def delta(metric_name, **labels):
        return metric(after, metric_name, **labels) - metric(before, metric_name, **labels)

    ok = {"method": "POST", "route": "/v1/predict", "status": "200"}
    assert delta("imgclf_http_requests_total", **ok) == 2
    assert delta("imgclf_http_requests_total", **{**ok, "status": "400"}) == 1
    assert delta("imgclf_http_requests_total", **{**ok, "status": "415"}) == 1
    assert delta("imgclf_http_request_duration_seconds_count", route="/v1/predict") == 4
    assert delta("imgclf_predictions_total", label=label) == 2
    info = {"name": served_model.name, "version": served_model.version}
    assert metric(after, "imgclf_model_info", **info) == 1


def test_more_files_than_allowed_is_400(client, digits_splits):
    png = grey_png(digit_image(digits_splits))
    response = post_files(client, *[(f"{i}.png", png, "image/png") for i in range(MAX_FILES + 1)])
    assert response.status_code == 400
    assert str(MAX_FILES) in response.json()["detail"]
    assert post_files(client, *[(f"{i}.png", png, "image/png") for i in range(MAX_FILES)]).status_code == 200


def test_multipart_without_a_boundary_is_400(client):
    response = client.post("/v1/predict", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert response.status_code == 400
    assert response.json()["detail"]


class BrokenSession:
    def run(self, *args, **kwargs):
        raise RuntimeError("a bug, not the user's fault: /secret/path/model.py line 1")


def test_a_bug_is_a_json_500_without_a_traceback(served_model, digits_splits):
    broken = dataclasses.replace(served_model, session=BrokenSession())
    with running_server(create_app(broken)) as url, httpx.Client(base_url=url) as client:
        response = post_files(client, ("a.png", grey_png(digit_image(digits_splits)), "image/png"))
        assert response.status_code == 500
        assert response.json() == {"detail": "internal server error"}
        assert client.get("/health").status_code == 200
