"""The served digits model (tests/conftest.py trains and exports it), real uvicorn servers, and
images made by the tests."""

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOKEN = "test-token-6f1c"


@pytest.fixture(autouse=True)
def version_cache(tmp_path, monkeypatch) -> Path:
    """Registry versions are cached in each test's own folder, never in the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "imgclf" / "registry"


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
