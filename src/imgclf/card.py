"""The model card: what a model expects as input and what it answers, one typed record.

normalize writes it (data/normalized/card.json), the train stage's checkpoint carries it, export
writes it into the ONNX file's `imgclf.card` metadata and into models/model.json, and predict and
serve read it back from the ONNX file. Each form is `ModelCard.to_json()`; each reader is
`ModelCard.from_json()`, which refuses a record that is not exactly one.

The export stage adds how the file computes (`Quantization`): float32 throughout, or int8.
The cards of normalize and train have none: no file has been made from them yet.

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


SCHEMES = ("none", "int8")
INT8_WEIGHTS = "int8 per channel"  # symmetric, one scale per output channel of each Conv and Gemm
INT8_ACTIVATIONS = ("uint8", "int8")


@dataclass(frozen=True)
class Quantization:
    """How an exported graph computes: "none", float32 throughout; "int8", ONNX Runtime's static
    QDQ quantization (imgclf.stages.quantize): int8 weights, 8-bit activations whose scales come
    from `calibration_images` training images."""

    scheme: Literal["none", "int8"]
    weights: str = "float32"
    activations: str = "float32"
    calibration_images: int = 0

    def __post_init__(self):
        if self.scheme == "none":
            valid = (self.weights, self.activations, self.calibration_images) == ("float32", "float32", 0)
        elif self.scheme == "int8":
            count = self.calibration_images
            valid = (
                self.weights == INT8_WEIGHTS
                and self.activations in INT8_ACTIVATIONS
                and isinstance(count, int)
                and not isinstance(count, bool)
                and count > 0
            )
        else:
            raise ValueError(f"quantization scheme={self.scheme!r}: expected one of {SCHEMES}")
        if not valid:
            raise ValueError(f"quantization {self.to_json()}: not what scheme {self.scheme!r} computes with")

    def to_json(self) -> dict:
        return {
            "scheme": self.scheme,
            "weights": self.weights,
            "activations": self.activations,
            "calibration_images": self.calibration_images,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Quantization":
        if set(data) != set(cls.__dataclass_fields__):
            raise ValueError(
                f"quantization: expected keys {sorted(cls.__dataclass_fields__)}, got {sorted(data)}"
            )
        return cls(**data)


NO_QUANTIZATION = Quantization("none")


@dataclass(frozen=True)
class ModelCard:
    """Classes (index = label), the input spec and the normalisation of one model; once exported,
    its quantization (None before: the cards of the data and of the checkpoint)."""

    classes: tuple[str, ...]
    input: InputSpec
    normalization: Normalization
    quantization: Quantization | None = None

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
        data = {
            "classes": list(self.classes),
            "input": self.input.to_json(),
            "normalization": self.normalization.to_json(),
        }
        if self.quantization is not None:
            data["quantization"] = self.quantization.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> "ModelCard":
        """The card `to_json` wrote (other keys beside it, as in model.json, are ignored);
        ValueError, KeyError or TypeError if it is not one."""
        if not isinstance(data["classes"], list):
            raise TypeError(f"classes {data['classes']!r}: expected a list of names")
        quantization = data.get("quantization")  # none in the data's card, nor in files exported before it
        return cls(
            tuple(data["classes"]),
            InputSpec.from_json(data["input"]),
            Normalization.from_json(data["normalization"]),
            None if quantization is None else Quantization.from_json(quantization),
        )
