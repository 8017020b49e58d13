"""The model card: what a model expects as input and what it answers, one typed record.

normalize writes it (data/normalized/card.json), the train stage's checkpoint carries it, export
writes it into the ONNX file's `imgclf.card` metadata and into models/model.json, and predict and
serve read it back from the ONNX file. Each form is `ModelCard.to_json()`; each reader is
`ModelCard.from_json()`, which refuses a record that is not exactly one.

Plain Python (no numpy, no torch): the inference path imports this module.
"""

from dataclasses import dataclass
from typing import Literal

MODE_CHANNELS = {"L": 1, "RGB": 3}  # colour mode -> channels of the (C, H, W) array
RESIZES = ("stretch", "crop")
DTYPE, LAYOUT = "uint8", "NCHW"  # every imgclf model takes raw pixels, channels first


@dataclass(frozen=True)
class InputSpec:
    """The model's input: colour mode, size (height, width) and how other sizes are fitted to it.

    resize "stretch" scales each side to size (aspect ratio not kept); "crop" scales the shorter
    side to size and cuts the centre of the longer one.
    """

    mode: Literal["L", "RGB"]
    size: tuple[int, int]  # (height, width), the order of the array axes
    resize: Literal["stretch", "crop"]

    def __post_init__(self):
        if self.mode not in MODE_CHANNELS:
            raise ValueError(f"mode={self.mode!r}: expected one of {tuple(MODE_CHANNELS)}")
        if self.resize not in RESIZES:
            raise ValueError(f"resize={self.resize!r}: expected one of {RESIZES}")
        size = tuple(self.size)
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise ValueError(f"size={self.size!r}: expected (height, width), two positive integers")
        object.__setattr__(self, "size", size)  # a list from JSON or YAML becomes the tuple

    @classmethod
    def for_shape(cls, shape: tuple[int, int, int], resize: Literal["stretch", "crop"]) -> "InputSpec":
        """The spec of uint8 arrays of `shape` (C, H, W): 1 channel is "L", 3 are "RGB"."""
        channels, height, width = shape
        modes = {n: mode for mode, n in MODE_CHANNELS.items()}
        if channels not in modes:
            raise ValueError(f"shape {tuple(shape)}: {channels} channels; expected 1 (L) or 3 (RGB)")
        return cls(modes[channels], (height, width), resize)

    @property
    def channels(self) -> int:
        return MODE_CHANNELS[self.mode]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (C, H, W) shape of one image."""
        return (self.channels, *self.size)

    def to_json(self) -> dict:
        """The spec, plus the tensor it describes (dtype, layout, shape) for readers of the JSON."""
        return {
            "mode": self.mode,
            "size": list(self.size),
            "resize": self.resize,
            "dtype": DTYPE,
            "layout": LAYOUT,
            "shape": ["batch", *self.shape],
        }

    @classmethod
    def from_json(cls, data: dict) -> "InputSpec":
        """The spec `to_json` wrote; ValueError if `data` is not exactly one."""
        spec = cls(data["mode"], data["size"], data["resize"])
        if spec.to_json() != data:
            raise ValueError(f"input {data}: inconsistent; expected {spec.to_json()}")
        return spec


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of the training pixels (0..255); the network's first layer."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"normalization: {len(self.mean)} means and {len(self.std)} stds")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"normalization: std {list(self.std)} must be positive")

    def to_json(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: dict) -> "Normalization":
        if set(data) != {"mean", "std"}:
            raise ValueError(f"normalization: expected keys mean and std, got {sorted(data)}")
        return cls(data["mean"], data["std"])


@dataclass(frozen=True)
class ModelCard:
    """Classes (index = label), the input spec and the normalisation of one model."""

    classes: tuple[str, ...]
    input: InputSpec
    normalization: Normalization

    def __post_init__(self):
        classes = tuple(self.classes)
        if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
            raise ValueError(f"classes {list(classes)}: expected at least two non-empty names")
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes {list(classes)}: names repeat")
        if len(self.normalization.mean) != self.input.channels:
            raise ValueError(
                f"normalization has {len(self.normalization.mean)} channels, "
                f"input mode {self.input.mode!r} has {self.input.channels}"
            )
        object.__setattr__(self, "classes", classes)

    def to_json(self) -> dict:
        return {
            "classes": list(self.classes),
            "input": self.input.to_json(),
            "normalization": self.normalization.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict) -> "ModelCard":
        """The card `to_json` wrote (other keys beside it, as in model.json, are ignored);
        ValueError, KeyError or TypeError if it is not one."""
        if not isinstance(data["classes"], list):
            raise TypeError(f"classes {data['classes']!r}: expected a list of names")
        return cls(
            tuple(data["classes"]),
            InputSpec.from_json(data["input"]),
            Normalization.from_json(data["normalization"]),
        )
