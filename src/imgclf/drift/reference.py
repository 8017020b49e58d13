"""The reference a model's traffic is compared with: what the model did on held-out images.

The export stage runs the exported model on the validation split (never the training split: a
model is overconfident on what it trained on, and a reference from it made 6 % of windows with no
drift alarm) and stores the result in the ONNX file's metadata under `imgclf.reference`, beside
the model card, and in models/model.json. A registry version so carries its own reference.

Per image, from its uint8 pixels and the model's probabilities, and for nothing that needs a label:
- `class`: the predicted class (counts per class are stored);
- `confidence`: the top-1 probability;
- `brightness`: the mean pixel value (0-255, all channels);
- `contrast`: the standard deviation of the pixel values;
- `centroid_x`, `centroid_y`: where the image's intensity lies, its centre of mass as a fraction
  of the width and height (0.5: the middle): framing and shifts that leave the pixel values'
  spread unchanged move it;
- `size`, `aspect`: the uploaded image before resizing (as displayed, EXIF orientation applied):
  the side of a square of its area, sqrt(width x height) in pixels, and width / height. They come
  from data/normalized's `sizes.npy`; a split normalized without one gives a reference without
  them, and an image that comes as a tensor rather than a file (no upload size) adds nothing to them.

Values are rounded to DECIMALS, so that identical training gives an identical model.onnx on CPUs
whose kernels differ in the last bits, and the monitor rounds what it sees the same way. At most
MAX_VALUES values per signal are stored: evenly spaced order statistics of a larger split, which
the KS test then treats as a sample of that size (a little less power, never more false alarms).
"""

import json
from dataclasses import dataclass

import numpy as np

METADATA_KEY = "imgclf.reference"  # the ONNX metadata key, beside imgclf.card
FORMAT = 1
DECIMALS = 4
MAX_VALUES = 1000
UPLOAD_SIGNALS = ("size", "aspect")  # the source image's, before resizing: NaN when unknown
DISTRIBUTIONS = ("confidence", "brightness", "contrast", "centroid_x", "centroid_y", *UPLOAD_SIGNALS)
SIGNALS = ("class", *DISTRIBUTIONS)
# Per-image input statistics look at no more than about this many pixels: a fixed stride over
# a larger image, the same in the reference and the server, so a 224x224 RGB image costs what a
# 64x64 one does.
STATISTIC_PIXELS = 64 * 64


class ReferenceError(ValueError):
    """The metadata holds a reference this code cannot read."""


@dataclass(frozen=True)
class Reference:
    split: str  # which split it was computed on ("val")
    images: int
    class_counts: tuple[int, ...]  # per class index
    distributions: dict[str, np.ndarray]  # signal -> sorted values (at most MAX_VALUES)

    @property
    def signals(self) -> tuple[str, ...]:
        """The signals this reference can test, in SIGNALS' order."""
        return tuple(name for name in SIGNALS if name == "class" or name in self.distributions)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "split": self.split,
            "images": self.images,
            "class_counts": list(self.class_counts),
            "distributions": {name: values.tolist() for name, values in self.distributions.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> "Reference":
        try:
            if data["format"] != FORMAT:
                raise ReferenceError(f"reference format {data['format']!r}, this imgclf reads {FORMAT}")
            stored = data["distributions"]
            required = [name for name in DISTRIBUTIONS if name not in UPLOAD_SIGNALS]
            distributions = {
                name: np.asarray(stored[name], dtype=float)
                for name in (*required, *(name for name in UPLOAD_SIGNALS if name in stored))
            }
            counts = tuple(int(c) for c in data["class_counts"])
            return cls(str(data["split"]), int(data["images"]), counts, distributions)
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, ReferenceError):
                raise
            raise ReferenceError(f"malformed reference: {error!r}") from None

    def summary(self) -> dict:
        """What /v1/monitor shows of it: sizes, class frequencies, medians."""
        total = sum(self.class_counts) or 1
        return {
            "split": self.split,
            "images": self.images,
            "class_frequencies": [round(c / total, DECIMALS) for c in self.class_counts],
            "median": {name: float(np.median(values)) for name, values in self.distributions.items()},
        }


def read_reference(metadata: dict[str, str]) -> Reference | None:
    """The reference in an ONNX file's custom metadata; None for a model exported without one."""
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ReferenceError(f"{METADATA_KEY} is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise ReferenceError(f"{METADATA_KEY} is not a JSON object")
    return Reference.from_json(data)


def input_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Brightness, contrast and intensity centroid of each uint8 (N, C, H, W) image, from a
    strided subset of at most about STATISTIC_PIXELS pixels per channel."""
    height, width = images.shape[-2:]
    stride = max(1, int(np.ceil(np.sqrt(height * width / STATISTIC_PIXELS))))
    if stride > 1:
        images = images[..., ::stride, ::stride]
    n, _, h, w = images.shape
    flat = images.reshape(n, -1).astype(np.float64)
    intensity = images.sum(axis=1, dtype=np.float64)  # (N, h, w), channels added
    total = intensity.sum(axis=(1, 2))
    blank = total == 0  # an all-black image: its centroid is the middle
    total[blank] = 1.0
    centroid_x = intensity.sum(axis=1) @ np.linspace(0, 1, w) / total
    centroid_y = intensity.sum(axis=2) @ np.linspace(0, 1, h) / total
    centroid_x[blank] = centroid_y[blank] = 0.5
    return {
        "brightness": flat.mean(axis=1),
        "contrast": flat.std(axis=1),
        "centroid_x": centroid_x,
        "centroid_y": centroid_y,
    }


def upload_statistics(sizes: np.ndarray | None, n: int) -> dict[str, np.ndarray]:
    """`size` and `aspect` of n images from their (width, height) before resizing, (n, 2); NaN for
    an image whose size is unknown (a row of zeros, or no `sizes` at all)."""
    if sizes is None:
        return {name: np.full(n, np.nan) for name in UPLOAD_SIGNALS}
    width, height = np.asarray(sizes, dtype=np.float64).reshape(n, 2).T
    known = (width > 0) & (height > 0)
    return {
        "size": np.where(known, np.sqrt(width * height), np.nan),
        "aspect": np.where(known, width / np.where(known, height, 1.0), np.nan),
    }


def image_signals(
    images: np.ndarray, probabilities: np.ndarray, sizes: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Each signal's per-image values for a batch: what the reference and the monitor both use.
    sizes: each image's (width, height) as uploaded, (N, 2); None when they came as tensors."""
    return {
        "class": probabilities.argmax(axis=1),
        "confidence": probabilities.max(axis=1).astype(np.float64),
        **input_statistics(images),
        **upload_statistics(sizes, len(images)),
    }


def build_reference(
    images: np.ndarray, probabilities: np.ndarray, split: str = "val", sizes: np.ndarray | None = None
) -> Reference:
    """The reference from a held-out split's uint8 images and the exported model's probabilities,
    with the images' (width, height) before resizing when the split records them."""
    values = image_signals(images, probabilities, sizes)
    n_classes = probabilities.shape[1]
    counts = np.bincount(values["class"], minlength=n_classes)
    known_sizes = not np.isnan(values["size"]).all()
    stored = [name for name in DISTRIBUTIONS if name not in UPLOAD_SIGNALS or known_sizes]
    distributions = {name: _stored(values[name]) for name in stored}
    return Reference(split, len(images), tuple(int(c) for c in counts), distributions)


def _stored(values: np.ndarray) -> np.ndarray:
    ordered = np.sort(np.round(values[~np.isnan(values)], DECIMALS))
    if len(ordered) > MAX_VALUES:
        ranks = ((np.arange(MAX_VALUES) + 0.5) * len(ordered) / MAX_VALUES).astype(int)
        ordered = ordered[ranks]
    return ordered
