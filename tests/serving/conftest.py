"""A real digits model for the serving tests, real uvicorn servers, and images made by the tests.

The model is trained here for a few seconds with a plain PyTorch loop on the digits splits that
the real download and normalize stages produce, then exported by the export stage's `to_onnx`,
so its predictions mean something and its file is what the pipeline would ship. It is exported
twice: with `resize: stretch` (the model most tests serve) and with `resize: crop`.
"""

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOKEN = "test-token-6f1c"
EPOCHS = 25


@pytest.fixture(scope="session")
def digits_splits(digits_dirs) -> dict:
    """The normalized digits splits: images uint8 (N, 1, 8, 8), labels, classes, stats."""
    _, normalized = digits_dirs
    splits = {
        split: (np.load(normalized / split / "images.npy"), np.load(normalized / split / "labels.npy"))
        for split in ("train", "test")
    }
    classes = json.loads((normalized / "classes.json").read_text())
    stats = json.loads((normalized / "stats.json").read_text())
    return {**splits, "classes": classes, "stats": stats}


@pytest.fixture(scope="session")
def digits_network(digits_splits) -> tuple:
    """(the trained network with its softmax, an example batch, its model card without "resize")."""
    import torch
    from torch.nn import functional

    from imgclf.export import Probabilities
    from imgclf.models import build_from_card

    images, labels = digits_splits["train"]
    card = {
        "model": {"name": "mlp", "hidden": [64], "activation": "relu", "dropout": 0.0},
        "input_shape": list(images.shape[1:]),
        "classes": digits_splits["classes"],
        "stats": digits_splits["stats"],
    }
    torch.manual_seed(0)
    net = build_from_card(card)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.from_numpy(images), torch.from_numpy(labels).long()
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(x)).split(64):
            loss = functional.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return Probabilities(net).eval(), x[:2], card


def export_model(digits_network: tuple, folder: Path, resize: str) -> Path:
    """model.onnx and its sidecar model.json, as the export stage lays them out in models/."""
    from imgclf.export import input_spec, to_onnx

    model, example, card = digits_network
    card = {**card, "resize": resize}
    proto = to_onnx(model, example, card)
    (folder / "model.onnx").write_bytes(proto.SerializeToString())
    sidecar = {
        "name": "digits-test",
        "classes": card["classes"],
        "input": input_spec(card),
        "lineage": {"mlflow_run_id": "0123456789abcdef", "data.name": "digits"},
    }
    (folder / "model.json").write_text(json.dumps(sidecar))
    return folder / "model.onnx"


@pytest.fixture(scope="session")
def model_path(digits_network, tmp_path_factory) -> Path:
    """The model that stretches an image to its 8x8 input."""
    return export_model(digits_network, tmp_path_factory.mktemp("models"), "stretch")


@pytest.fixture(scope="session")
def crop_model_path(digits_network, tmp_path_factory) -> Path:
    """The same network, exported to centre-crop an image to its 8x8 input."""
    return export_model(digits_network, tmp_path_factory.mktemp("crop-models"), "crop")


@pytest.fixture(scope="session")
def served_model(model_path):
    from imgclf.serving.model import ServedModel

    return ServedModel.load(str(model_path), threads=1)


@pytest.fixture(scope="session")
def reference_session(model_path):
    """A plain ONNX Runtime session on the same file: what the API must agree with."""
    import onnxruntime as ort

    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])


def reference_answer(reference_session, data: bytes, spec) -> np.ndarray:
    """The reference session's probabilities for an image file decoded by `decode_image` with `spec`."""
    from imgclf.images import decode_image

    pixels = decode_image(data, spec, max_pixels=10**8)
    return reference_session.run(None, {"image": pixels[None]})[0][0]


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:
    """A real uvicorn server on a free 127.0.0.1 port, in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", ws="none", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="session")
def base_url(served_model) -> Iterator[str]:
    from imgclf.serving.app import create_app

    with running_server(create_app(served_model)) as url:
        yield url


@pytest.fixture(scope="session")
def secured_url(served_model) -> Iterator[str]:
    from imgclf.serving.app import create_app

    with running_server(create_app(served_model, token=TOKEN)) as url:
        yield url


@pytest.fixture
def client(base_url):
    import httpx

    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def wide_digits(digits_splits, indices=(0, 5, 9), scale: int = 8) -> np.ndarray:
    """Three test digits side by side, each scaled up `scale` times: a uint8 (8, 24) * scale image.

    Larger than the 8x8 model input and three times as wide as high, so the centre crop (the
    middle digit alone) and the stretch (all three, squeezed) are different inputs.
    """
    strip = np.concatenate([digits_splits["test"][0][i][0] for i in indices], axis=1)
    return np.kron(strip, np.ones((scale, scale), dtype=np.uint8))


def grey_png(pixels: np.ndarray) -> bytes:
    """A (1, H, W) or (H, W) uint8 array as an 8-bit greyscale PNG of exactly that size."""
    return encode(Image.fromarray(np.asarray(pixels, dtype=np.uint8).reshape(pixels.shape[-2:]), "L"))
