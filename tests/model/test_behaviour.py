"""Behaviour of a trained model, as a user meets it (Made-With-ML's model tests): a digits model
exported by the export stage, run by ONNX Runtime on uploads decoded by the same function as
`imgclf predict` and `imgclf serve`.

Invariance: what should not change the answer does not. The rates are over the whole test split
and leave room for the few digits that sit on a decision boundary. On 8x8 digits one pixel is an
eighth of the image: only a model trained with shifts (train.augment.crop_padding, as the MNIST
recipe does) keeps its labels, and a model trained without them is the control that shows the
test can fail.
"""

import io

import numpy as np
import pytest
from PIL import Image

from imgclf.images import decode_image
from imgclf.runtime import inference_session
from tests.conftest import train_digits_network

MAX_PIXELS = 10**6


def exported(network: tuple, folder) -> tuple:
    """An ONNX Runtime session on the network as the export stage writes it, and its input spec."""
    import torch

    from imgclf.stages.export import to_onnx

    model, example, card = network
    path = folder / "model.onnx"
    path.write_bytes(to_onnx(model, torch.as_tensor(example), card).SerializeToString())
    return inference_session(path), card.input


@pytest.fixture(scope="module")
def model(digits_splits, tmp_path_factory):
    """Trained with one-pixel shifts."""
    return exported(train_digits_network(digits_splits, crop_padding=1), tmp_path_factory.mktemp("shifts"))


@pytest.fixture(scope="module")
def unshifted_model(digits_network, tmp_path_factory):
    """Trained on the digits as they are (the serving tests' model)."""
    return exported(digits_network, tmp_path_factory.mktemp("plain"))


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Each image moved by (dy, dx) pixels, the uncovered edge filled with background (0)."""
    shifted = np.zeros_like(images)
    h, w = images.shape[2:]
    shifted[:, :, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = images[
        :, :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return shifted


def labels(session, images: np.ndarray) -> np.ndarray:
    return session.run(None, {"image": np.ascontiguousarray(images)})[0].argmax(axis=1)


def encoded(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels[0], "L").save(buffer, fmt, **options)
    return buffer.getvalue()


def test_the_model_is_worth_testing(model, digits_splits):
    session, _ = model
    images, truth = digits_splits["test"]
    assert (labels(session, images) == truth).mean() >= 0.9


@pytest.mark.parametrize(("dy", "dx"), [(0, 1), (0, -1), (1, 0), (-1, 0)])
def test_a_digit_shifted_by_one_pixel_keeps_its_label(model, unshifted_model, digits_splits, dy, dx):
    images, _ = digits_splits["test"]
    session, _ = model
    kept = labels(session, shift(images, dy, dx)) == labels(session, images)
    assert kept.mean() >= 0.85, f"{(~kept).sum()} of {len(kept)} digits changed label when shifted"
    session, _ = unshifted_model
    assert (labels(session, shift(images, dy, dx)) == labels(session, images)).mean() < 0.8


def test_the_png_and_the_jpeg_of_one_image_get_the_same_label(model, digits_splits):
    session, spec = model
    images, _ = digits_splits["test"]
    # Each digit saved both ways at its own size, JPEG at Pillow's default quality, then decoded
    # as an upload. (Scaled up first, the JPEG's loss would average away in the resize.)
    as_png = np.stack([decode_image(encoded(image, "PNG"), spec, MAX_PIXELS) for image in images])
    as_jpeg = np.stack(
        [decode_image(encoded(image, "JPEG", quality=75), spec, MAX_PIXELS) for image in images]
    )
    np.testing.assert_array_equal(as_png, images)  # PNG is lossless
    assert np.abs(as_jpeg.astype(int) - images).mean() > 2  # JPEG is not: the inputs really differ
    same = labels(session, as_png) == labels(session, as_jpeg)
    assert same.mean() >= 0.97, f"{(~same).sum()} of {len(same)} digits changed label as a JPEG"
