"""Static int8 quantization of the exported graph (`export.quantize: int8`), gated on agreement.

ONNX Runtime's static quantization in the QDQ format: QuantizeLinear/DequantizeLinear pairs
around each Conv, Gemm and MatMul (and the ReLU, max-pool and flatten between them), weights int8
with one scale per output channel, activations uint8 with scales from the ranges (min, max) the
float32 graph shows on a seeded sample of the training split. ONNX Runtime fuses each pair with
its operator into an integer kernel (VNNI where the CPU has it).

What stays float32, measured on MNIST (bench/int8.py): the normalisation; a convolution over the
image itself (3 channels or fewer: 9 to 27 products per output, too short for the int8 kernels;
in int8 MNIST's first convolution took 4x its float32 time, and keeping it float32 took the CNN's
batch-1 speed-up from 1.5x to 1.9x); the output of each Gemm (the integer kernel writes
float32 at no extra cost, so the logits, hence the probabilities, keep their precision); the
softmax. Dynamic quantization is not offered: it re-measures activations on every call, and was
measured 5x slower for the CNN.

The int8 graph is gated against the float32 graph it came from, on the whole test split: the
share of images where both pick the same class must reach `export.min_agreement`; the largest
and mean probability differences are reported beside it.
"""

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from imgclf.card import INT8_WEIGHTS, Quantization
from imgclf.errors import ImgclfError
from imgclf.runtime import inference_session, predict_probabilities

# uint8 activations with int8 weights: what ONNX Runtime recommends on x86; on MNIST, int8
# activations agreed with float32 on exactly the same images, no faster.
ACTIVATIONS = "uint8"
# Operators whose inputs are quantized: the layers with weights and what runs between them.
OPERATORS = ("Conv", "Gemm", "MatMul", "Relu", "MaxPool", "Flatten", "Reshape")
FLOAT_OUTPUTS = ("Gemm",)  # their integer kernels write float32: the logits keep their precision
IMAGE_CHANNELS = 3  # a Conv over this many input channels or fewer (the image's: L or RGB) stays float32
CALIBRATION_BATCH = 64


class AgreementError(ImgclfError):
    """The int8 graph picks another class than the float32 graph too often."""


def calibration_sample(images: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` images of the training split (all, if it has fewer), drawn with `seed`, in split order:
    the same data and seed give the same sample, hence the same scales and the same file."""
    if count >= len(images):
        return images
    picked = np.sort(np.random.default_rng(seed).choice(len(images), size=count, replace=False))
    return images[picked]


def quantize_int8(proto: onnx.ModelProto, sample: np.ndarray) -> onnx.ModelProto:
    """The int8 QDQ graph of the float32 `proto`, calibrated (min-max) on `sample`; deterministic.

    Graph-level metadata (the card) is not carried over: the caller writes the int8 card."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    input_name = proto.graph.input[0].name

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(sample, max(1, -(-len(sample) // CALIBRATION_BATCH))))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch)}

    with tempfile.TemporaryDirectory(prefix="imgclf-quantize-") as folder, _quiet():
        # A file, not the proto: given a proto, quantize_static moves its weights out to files.
        source, output = Path(folder) / "float32.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(proto.SerializeToString())
        quantize_static(
            source,
            output,
            Batches(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(OPERATORS),
            nodes_to_exclude=image_convolutions(proto),
            per_channel=True,
            activation_type=QuantType.QUInt8 if ACTIVATIONS == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            extra_options={"OpTypesToExcludeOutputQuantization": list(FLOAT_OUTPUTS)},
        )
        quantized = onnx.load(output)
    del quantized.metadata_props[:]
    quantized.producer_name, quantized.producer_version = proto.producer_name, proto.producer_version
    quantized.doc_string = ""
    return quantized


def image_convolutions(proto: onnx.ModelProto) -> list[str]:
    """The Conv nodes that read IMAGE_CHANNELS channels or fewer: they stay float32."""
    weights = {tensor.name: tensor.dims for tensor in proto.graph.initializer}
    return [
        node.name
        for node in proto.graph.node
        if node.op_type == "Conv"
        and len(weights.get(node.input[1], ())) == 4
        and weights[node.input[1]][1] <= IMAGE_CHANNELS
    ]


def int8_quantization(calibration_images: int) -> Quantization:
    """What an int8 graph of this module is, for the model card."""
    return Quantization("int8", INT8_WEIGHTS, ACTIVATIONS, calibration_images)


def check_agreement(reference: onnx.ModelProto, quantized: onnx.ModelProto, images: np.ndarray) -> dict:
    """How the int8 graph's probabilities differ from the float32 graph's on `images`."""
    expected = predict_probabilities(inference_session(reference.SerializeToString()), images)
    actual = predict_probabilities(inference_session(quantized.SerializeToString()), images)
    difference = np.abs(expected - actual)
    return {
        "int8_agreement": float((expected.argmax(1) == actual.argmax(1)).mean()),
        "int8_max_abs_diff": float(difference.max()),
        "int8_mean_abs_diff": float(difference.mean()),
        "int8_n": len(images),
    }


def gate_agreement(agreement: dict, min_agreement: float) -> None:
    """AgreementError, in one line, if the int8 graph agrees with float32 less than required."""
    if agreement["int8_agreement"] < min_agreement:
        n = agreement["int8_n"]
        same = round(agreement["int8_agreement"] * n)
        raise AgreementError(
            f"the int8 model picks the float32 model's class on {same} of {n} test images "
            f"({agreement['int8_agreement']:.2%}), below export.min_agreement={min_agreement:g}; "
            "ship float32 (export.quantize=none) or lower the bound"
        )


@contextlib.contextmanager
def _quiet():
    """Mute the quantizer's advice to pre-process the graph: the exporter has already folded the
    batch norms into the convolutions, which is what that pre-processing would do here."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
