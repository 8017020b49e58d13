"""The Open Inference Protocol V2 (serving.v2) as tritonclient speaks it, against a real uvicorn
server: probes, metadata, inference with the UINT8 tensor (JSON and binary) and with encoded images
(BYTES), answers equal to POST /v1/predict's to the last bit, and every bad request a 4xx in the
protocol's `{"error": ...}` form. One server for the module: with a token, a drift reference and
capture on, so the token, the monitor and capture are checked on the same requests."""

import base64
import json
import os
import struct
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from imgclf.serving.app import MAX_FILES, create_app
from imgclf.serving.capture import Capture
from imgclf.serving.limits import MIB
from imgclf.serving.model import ServedModel
from tests.serving.conftest import TOKEN, encode, grey_png, running_server, wide_digits


def auth() -> dict[str, str]:
    """The token's header, a new dict each time: tritonclient adds its own headers to the one given."""
    return {"Authorization": f"Bearer {TOKEN}"}


INFER = "/v2/models/{name}/infer"
MAX_BODY = MIB  # the module's server: small, so a body over it is cheap to send


@dataclass(frozen=True)
class Server:
    url: str
    model: ServedModel
    capture: Capture

    @property
    def infer_path(self) -> str:
        return INFER.format(name=self.model.name)


@pytest.fixture(scope="module")
def server(monitored_model_path, tmp_path_factory):
    model = ServedModel.load(str(monitored_model_path), threads=1)
    capture = Capture(tmp_path_factory.mktemp("captures"), below=1.01)  # keeps every upload
    app = create_app(model, token=TOKEN, max_body_bytes=MAX_BODY, capture=capture)
    with running_server(app) as url:
        yield Server(url, model, capture)
    capture.close()


@pytest.fixture(scope="module")
def triton(server):
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers=auth(), timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def digits(digits_splits) -> np.ndarray:
    """Five test digits, uint8 (5, 1, 8, 8): the model's own input, and 8x8 PNGs decode to them."""
    return np.ascontiguousarray(digits_splits["test"][0][[0, 7, 11, 25, 42]])


def v1_predict(http: httpx.Client, files: list[bytes]) -> np.ndarray:
    """POST /v1/predict's probabilities for these files in one request, float32 (N, classes)."""
    response = http.post("/v1/predict", files=[("file", (f"{i}.img", f)) for i, f in enumerate(files)])
    assert response.status_code == 200, response.text
    rows = [list(p["probabilities"].values()) for p in response.json()["predictions"]]
    return np.array(rows, dtype=np.float32)  # every class in order; the JSON floats are float32's


def pixels_input(images: np.ndarray, binary: bool) -> triton_http.InferInput:
    tensor = triton_http.InferInput("image", list(images.shape), "UINT8")
    return tensor.set_data_from_numpy(images, binary_data=binary)


def files_input(files: list[bytes], binary: bool) -> triton_http.InferInput:
    """The BYTES input: raw bytes in binary; base64 strings in JSON (JSON strings cannot hold bytes)."""
    elements = files if binary else [base64.b64encode(f).decode() for f in files]
    tensor = triton_http.InferInput("image_bytes", [len(files)], "BYTES")
    return tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)


def test_probes_are_open_and_metadata_describes_the_model(triton, server):
    model = server.model
    assert triton.is_server_live() and triton.is_server_ready()  # no token: probers send none
    metadata = triton.get_server_metadata(headers=auth())
    assert metadata["name"] == "imgclf" and metadata["extensions"] == ["binary_tensor_data"]
    assert triton.is_model_ready(model.name, headers=auth())
    assert triton.is_model_ready(model.name, model.version, headers=auth())
    assert not triton.is_model_ready(model.name, "7", headers=auth())
    assert not triton.is_model_ready("another-model", headers=auth())
    described = triton.get_model_metadata(model.name, headers=auth())
    assert described["name"] == "digits-test" and described["versions"] == [model.version]
    assert described["platform"] == "onnxruntime_onnx"
    assert described["inputs"] == [
        {"name": "image", "datatype": "UINT8", "shape": [-1, 1, 8, 8]},
        {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
    ]
    assert described["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert described["parameters"]["classes"] == [str(d) for d in range(10)]
    assert "base64" in described["parameters"]["image_bytes"]
    assert triton.get_model_metadata(model.name, model.version, headers=auth()) == described
    with pytest.raises(InferenceServerException) as unknown:
        triton.get_model_metadata(model.name, "7", headers=auth())
    assert unknown.value.status() == "404" and model.version in unknown.value.message()


@pytest.mark.parametrize(
    "binary_in, binary_out", [(False, False), (True, True), (False, True), (True, False), (True, None)]
)
def test_pixels_answer_as_v1_predict_does_in_json_and_binary(
    triton, http, server, digits, binary_in, binary_out
):
    expected = v1_predict(http, [grey_png(image) for image in digits])
    # None: no output named, so tritonclient asks for every output in binary (binary_data_output).
    outputs = None if binary_out is None else [triton_http.InferRequestedOutput("probabilities", binary_out)]
    result = triton.infer(
        server.model.name, [pixels_input(digits, binary_in)], outputs=outputs, headers=auth(), request_id="r1"
    )
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (5, 10)
    np.testing.assert_array_equal(probabilities, expected)
    output = result.get_output("probabilities")
    assert ("binary_data_size" in output.get("parameters", {})) == (binary_out is not False)
    response = result.get_response()
    assert response["model_version"] == server.model.version and response["id"] == "r1"


def test_a_plain_json_request_gets_a_plain_json_answer(http, server, digits):
    """What curl sends: no binary extension at all, nested data."""
    body = {
        "inputs": [{"name": "image", "shape": [5, 1, 8, 8], "datatype": "UINT8", "data": digits.tolist()}]
    }
    response = http.post(server.infer_path, json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in response.headers
    answer = response.json()
    assert answer["model_name"] == server.model.name and "id" not in answer
    (output,) = answer["outputs"]
    assert output["name"] == "probabilities" and output["shape"] == [5, 10]
    expected = v1_predict(http, [grey_png(image) for image in digits])
    np.testing.assert_array_equal(np.array(output["data"], dtype=np.float32).reshape(5, 10), expected)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json-base64"])
def test_encoded_images_answer_as_v1_predict_does(triton, http, server, digits_splits, digits, binary):
    wide = wide_digits(digits_splits)  # 64x192: resized by the model's own rule, as /v1/predict does
    files = [
        grey_png(digits[0]),
        encode(Image.fromarray(wide, "L"), "JPEG"),
        encode(Image.fromarray(np.stack([wide] * 3, axis=-1)).convert("RGBA")),
    ]
    expected = v1_predict(http, files)
    result = triton.infer(server.model.name, [files_input(files, binary)], headers=auth())
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)
    # The version route answers the same.
    again = triton.infer(
        server.model.name, [files_input(files, binary)], server.model.version, headers=auth()
    )
    np.testing.assert_array_equal(again.as_numpy("probabilities"), expected)


def test_pixels_and_their_png_give_the_same_answer(triton, server, digits):
    pixels = triton.infer(server.model.name, [pixels_input(digits, True)], headers=auth())
    files = triton.infer(
        server.model.name, [files_input([grey_png(d) for d in digits], True)], headers=auth()
    )
    np.testing.assert_array_equal(pixels.as_numpy("probabilities"), files.as_numpy("probabilities"))


def json_request(name: str, datatype: str, shape: list, data: list, **extra) -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}], **extra}


def binary_request(tensor: dict, payload: bytes, header_length: int | None = None) -> tuple[bytes, dict]:
    """A body in the binary extension: the JSON object, then `payload`; its length in the header."""
    header = json.dumps({"inputs": [tensor]}).encode()
    length = len(header) if header_length is None else header_length
    return header + payload, {HEADER: str(length)}


HEADER = "Inference-Header-Content-Length"
ZEROS = [0] * 64
PNG_BASE64 = base64.b64encode(grey_png(np.zeros((8, 8), np.uint8))).decode()
BINARY_IMAGE = {
    "name": "image",
    "datatype": "UINT8",
    "shape": [1, 1, 8, 8],
    "parameters": {"binary_data_size": 64},
}
# (request: JSON body, or (bytes, headers)), expected status, words the error must hold
BAD_REQUESTS = {
    "datatype": (json_request("image", "FP32", [1, 1, 8, 8], ZEROS), 400, "datatype 'FP32'"),
    "shape": (json_request("image", "UINT8", [1, 1, 8, 7], ZEROS[:56]), 400, "[N, 1, 8, 8]"),
    "empty batch": (json_request("image", "UINT8", [0, 1, 8, 8], []), 400, "shape [0, 1, 8, 8]"),
    "too few values": (json_request("image", "UINT8", [1, 1, 8, 8], ZEROS[:60]), 400, "64 integers"),
    "not integers": (json_request("image", "UINT8", [1, 1, 8, 8], [0.5] * 64), 400, "64 integers"),
    "strings as pixels": (json_request("image", "UINT8", [1, 1, 8, 8], ["0"] * 64), 400, "64 integers"),
    "over 255": (json_request("image", "UINT8", [1, 1, 8, 8], [256] * 64), 400, "0 to 255"),
    "ragged": (json_request("image", "UINT8", [1, 1, 8, 8], [[0, 1], [2]]), 400, "64 integers"),
    "garbage bytes": (
        json_request("image_bytes", "BYTES", [1], [base64.b64encode(b"nope").decode()]),
        400,
        "image_bytes[0]",
    ),
    "truncated image": (
        json_request(
            "image_bytes", "BYTES", [1], [base64.b64encode(base64.b64decode(PNG_BASE64)[:30]).decode()]
        ),
        400,
        "image_bytes[0]",
    ),
    "not base64": (json_request("image_bytes", "BYTES", [1], ["%%%"]), 400, "not base64"),
    "bytes as UINT8": (json_request("image_bytes", "UINT8", [1], [PNG_BASE64]), 400, "expected BYTES"),
    "too many images": (
        json_request("image_bytes", "BYTES", [MAX_FILES + 1], [PNG_BASE64] * (MAX_FILES + 1)),
        400,
        f"1 to {MAX_FILES} images",
    ),
    "unknown input": (json_request("pixels", "UINT8", [1, 1, 8, 8], ZEROS), 400, "unknown input 'pixels'"),
    "two inputs": (
        {"inputs": json_request("image", "UINT8", [1, 1, 8, 8], ZEROS)["inputs"] * 2},
        400,
        "2 inputs",
    ),
    "no data": ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 8, 8]}]}, 400, "no data"),
    "unknown output": (
        json_request("image", "UINT8", [1, 1, 8, 8], ZEROS, outputs=[{"name": "logits"}]),
        400,
        "unknown output 'logits'",
    ),
    "classification extension": (
        json_request(
            "image",
            "UINT8",
            [1, 1, 8, 8],
            ZEROS,
            outputs=[{"name": "probabilities", "parameters": {"classification": 3}}],
        ),
        400,
        "classification",
    ),
    "shape of strings": (json_request("image", "UINT8", ["1", 1, 8, 8], ZEROS), 400, "inputs.0.shape.0"),
    "not JSON": ((b"{nope", {}), 400, "bad inference request"),
    "no inputs": ({"inputs": []}, 400, "inputs"),
    "binary size off": (
        binary_request({**BINARY_IMAGE, "parameters": {"binary_data_size": 63}}, bytes(64)),
        400,
        "63",
    ),
    "binary without header": ((binary_request(BINARY_IMAGE, bytes(64))[0], {}), 400, "bad inference request"),
    "header length too long": (binary_request(BINARY_IMAGE, bytes(64), header_length=10**6), 400, HEADER),
    "header length not a number": (binary_request(BINARY_IMAGE, bytes(64), header_length=-3), 400, HEADER),
    "binary bytes cut short": (
        binary_request(
            {
                "name": "image_bytes",
                "datatype": "BYTES",
                "shape": [1],
                "parameters": {"binary_data_size": 10},
            },
            struct.pack("<I", 100) + bytes(6),
        ),
        400,
        "says 100 bytes",
    ),
}


@pytest.mark.parametrize("kind", BAD_REQUESTS)
def test_a_bad_request_is_a_400_in_the_protocols_form(http, server, kind):
    request, status, words = BAD_REQUESTS[kind]
    if isinstance(request, dict):
        response = http.post(server.infer_path, json=request)
    else:
        body, headers = request
        response = http.post(server.infer_path, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["error"], response.json()
    assert "Traceback" not in response.text


def test_tritonclient_reads_the_errors(triton, server):
    wrong = triton_http.InferInput("image", [1, 1, 8, 7], "UINT8").set_data_from_numpy(
        np.zeros((1, 1, 8, 7), np.uint8)
    )
    with pytest.raises(InferenceServerException) as shape:
        triton.infer(server.model.name, [wrong], headers=auth())
    assert shape.value.status() == "400" and "shape [1, 1, 8, 7]" in shape.value.message()
    garbage = files_input([b"these are my notes, not an image"], binary=True)
    with pytest.raises(InferenceServerException) as image:
        triton.infer(server.model.name, [garbage], headers=auth())
    assert image.value.status() == "400" and "not an image" in image.value.message()
    with pytest.raises(InferenceServerException) as model:
        triton.infer("another-model", [garbage], headers=auth())
    assert model.value.status() == "404" and "digits-test" in model.value.message()


@pytest.mark.parametrize(
    "path", ["/v2/models/another-model/infer", "/v2/models/digits-test/versions/sha256:000000000000/infer"]
)
def test_an_unknown_model_or_version_is_a_404(http, path):
    response = http.post(path, json=json_request("image", "UINT8", [1, 1, 8, 8], ZEROS))
    assert response.status_code == 404
    assert "digits-test" in response.json()["error"] or "sha256:" in response.json()["error"]


def test_a_compressed_body_is_a_415(http, server):
    response = http.post(server.infer_path, content=b"\x1f\x8b", headers={"Content-Encoding": "gzip"})
    assert response.status_code == 415 and "Content-Encoding 'gzip'" in response.json()["error"]


def test_a_body_over_the_limit_is_a_413_declared_or_not(http, server):
    big = os.urandom(MAX_BODY + 1)
    declared = http.post(server.infer_path, content=big)
    assert declared.status_code == 413 and "over the limit" in declared.json()["error"]

    def chunks():  # no Content-Length: counted while it is read
        yield big[:MIB]
        yield big[MIB:]

    chunked = http.post(server.infer_path, content=chunks())
    assert chunked.status_code == 413 and "over the server's limit" in chunked.json()["error"]


def test_the_pixels_of_many_images_are_limited_as_on_v1(served_model, digits_splits):
    """The same Classifier: a request's images hold at most 4 x the per-image pixel limit."""
    import dataclasses

    small = dataclasses.replace(served_model, max_pixels=64 * 64)
    png = encode(Image.new("L", (64, 64), 255))
    with running_server(create_app(small)) as url:
        client = triton_http.InferenceServerClient(url.removeprefix("http://"))
        with pytest.raises(InferenceServerException) as too_many:
            client.infer(small.name, [files_input([png] * 5, binary=True)])
        assert too_many.value.status() == "413" and "pixels in all" in too_many.value.message()
        assert client.infer(small.name, [files_input([png] * 4, binary=True)]).as_numpy(
            "probabilities"
        ).shape == (4, 10)
        client.close()


def test_a_swapped_model_is_served_under_its_new_version(served_model, crop_model_path, digits):
    """serving.follow swaps `live.model`: the protocol names the version served now, only that one."""
    from imgclf.serving.follow import LiveModel

    live = LiveModel(served_model)
    name, old = served_model.name, served_model.version
    with running_server(create_app(live)) as url:
        client = triton_http.InferenceServerClient(url.removeprefix("http://"))
        assert client.is_model_ready(name, old)
        live.model = ServedModel.load(str(crop_model_path), threads=1)  # what a poll does
        new = live.model.version
        assert new != old and live.model.name == name
        assert client.is_model_ready(name, new) and not client.is_model_ready(name, old)
        assert client.get_model_metadata(name)["versions"] == [new]
        result = client.infer(name, [pixels_input(digits, True)], new)
        assert result.get_response()["model_version"] == new
        with pytest.raises(InferenceServerException) as gone:
            client.infer(name, [pixels_input(digits, True)], old)
        assert gone.value.status() == "404" and f"version {new!r} is served" in gone.value.message()
        client.close()


def test_the_token_guards_v2_but_its_health_probes(server, triton):
    with httpx.Client(base_url=server.url) as anonymous:
        for response in (
            anonymous.get("/v2"),
            anonymous.get(f"/v2/models/{server.model.name}"),
            anonymous.get(f"/v2/models/{server.model.name}/ready"),
            anonymous.post(server.infer_path, json=json_request("image", "UINT8", [1, 1, 8, 8], ZEROS)),
            anonymous.get("/v2/models/x", headers={"Authorization": f"Bearer {TOKEN}x"}),
        ):
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert "bearer token" in response.json()["error"]
        assert anonymous.get("/v2/health/live").json() == {"live": True}
        assert anonymous.get("/v2/health/ready").json() == {"ready": True}
    with pytest.raises(InferenceServerException) as refused:
        triton.get_model_metadata(server.model.name)
    assert refused.value.status() == "401"


def metric(text: str, name: str, **labels: str) -> float:
    """A sample's value in Prometheus' text format; 0 if the series does not exist yet."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def monitored(http: httpx.Client) -> int:
    """Images the drift monitor has seen: its finished windows and the one filling now."""
    state = http.get("/v1/monitor").json()
    assert state["active"], state
    return state["windows_total"] * state["window"] + state["images_in_window"]


def test_v2_requests_are_counted_monitored_and_their_files_captured(triton, http, server):
    name = server.model.name
    server.capture.flush()
    before = (http.get("/metrics").text, monitored(http), http.get("/v1/captures").json()["waiting"])
    noise = np.random.default_rng(19).integers(
        0, 256, (2, 12, 12), dtype=np.uint8
    )  # images seen nowhere else
    result = triton.infer(name, [files_input([grey_png(n) for n in noise], True)], headers=auth())
    labels = result.as_numpy("probabilities").argmax(axis=1).tolist()
    pixels = np.random.default_rng(20).integers(0, 256, (3, 1, 8, 8), dtype=np.uint8)
    result = triton.infer(name, [pixels_input(pixels, True)], headers=auth())
    labels += result.as_numpy("probabilities").argmax(axis=1).tolist()
    with httpx.Client(base_url=server.url) as anonymous:  # refused before routing: still its route
        assert anonymous.post(server.infer_path, content=b"{}").status_code == 401
    http.post(server.infer_path, content=b"{")
    server.capture.flush()
    after = (http.get("/metrics").text, monitored(http), http.get("/v1/captures").json()["waiting"])

    def delta(metric_name, **labels):
        return metric(after[0], metric_name, **labels) - metric(before[0], metric_name, **labels)

    route = {"route": INFER, "method": "POST"}
    assert delta("imgclf_http_requests_total", **route, status="200") == 2
    assert delta("imgclf_http_requests_total", **route, status="401") == 1
    assert delta("imgclf_http_requests_total", **route, status="400") == 1
    classes = server.model.card.classes
    for label in set(labels):
        assert delta("imgclf_predictions_total", label=classes[label]) == labels.count(label)
    assert delta("imgclf_prediction_confidence_count") == 5
    assert after[1] - before[1] == 5  # the monitor saw the files and the pixels
    assert after[2] - before[2] == 2  # capture kept the two files; pixels are no file to keep
