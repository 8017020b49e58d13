"""Export: the ONNX graph takes uint8 pixels, matches PyTorch at any batch size, and is stable."""

import json

import numpy as np
import onnx
import pytest
import torch

from imgclf.card import ModelCard
from imgclf.models import build_model
from imgclf.runtime import inference_session
from imgclf.stages.export import CARD_METADATA, INPUT_NAME, OUTPUT_NAME, Probabilities, check_parity, to_onnx
from tests.conftest import compose_config, make_card

CARD = make_card((1, 8, 8), n_classes=10, resize="stretch")
CNN = compose_config("model=cnn", "model.channels=[4,8]", "model.hidden=16").model


def network(seed=0):
    torch.manual_seed(seed)
    net = build_model(CNN, CARD)
    for module in net.modules():  # non-trivial batchnorm statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return Probabilities(net).eval()


@pytest.fixture(scope="module")
def exported():
    model = network()
    example = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    return model, to_onnx(model, example, CARD)


def test_graph_signature_is_uint8_in_probabilities_out(exported):
    _, proto = exported
    onnx.checker.check_model(proto, full_check=True)
    (image,), (probabilities,) = proto.graph.input, proto.graph.output
    assert (image.name, probabilities.name) == (INPUT_NAME, OUTPUT_NAME)
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert probabilities.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert image.type.tensor_type.shape.dim[0].dim_param == "batch"
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert ModelCard.from_json(json.loads(metadata[CARD_METADATA])) == CARD
    assert json.loads(metadata[CARD_METADATA])["input"]["shape"] == ["batch", 1, 8, 8]
    assert json.loads(metadata[CARD_METADATA])["input"]["resize"] == "stretch"  # how serving sizes uploads


@pytest.mark.parametrize("batch", [1, 17, 300])
def test_onnx_runtime_matches_pytorch_at_any_batch_size(exported, batch):
    model, proto = exported
    images = np.random.default_rng(batch).integers(0, 256, (batch, 1, 8, 8), dtype=np.uint8)
    parity = check_parity(model, proto, images)
    assert parity["parity_max_abs_diff"] <= 1e-5
    assert parity["parity_argmax_mismatches"] == 0
    probabilities = inference_session(proto.SerializeToString()).run(None, {INPUT_NAME: images})[0]
    assert probabilities.shape == (batch, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_parity_check_catches_a_different_model(exported):
    _, proto = exported
    images = np.random.default_rng(0).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8)
    parity = check_parity(network(seed=1), proto, images)
    assert parity["parity_max_abs_diff"] > 1e-4


def test_same_weights_export_to_the_same_bytes(exported):
    _model, proto = exported
    example = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    again = to_onnx(network(), example, CARD)
    assert again.SerializeToString() == proto.SerializeToString()
    assert to_onnx(network(seed=3), example, CARD).SerializeToString() != proto.SerializeToString()


def test_no_source_paths_or_stack_traces_in_the_file(exported):
    _, proto = exported
    data = proto.SerializeToString()
    assert b"/src/imgclf" not in data and b".py" not in data
