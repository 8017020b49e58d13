"""The CIFAR ResNet: the paper's sizes, any input shape, a clear depth error, and ONNX parity."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from imgclf.card import Normalization
from imgclf.errors import ConfigError
from imgclf.models import build_model
from imgclf.models.resnet import BasicBlock, ResNet
from imgclf.stages.export import Probabilities, check_parity, to_onnx
from tests.conftest import compose_config, make_card


def resnet(depth: int, width: int):
    return compose_config("model=resnet", f"model.depth={depth}", f"model.width={width}").model


def n_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(("depth", "blocks", "parameters"), [(20, 9, 269_722), (32, 15, 464_154)])
def test_depth_gives_the_papers_blocks_and_size(depth, blocks, parameters):
    net = ResNet(resnet(depth, 16), (3, 32, 32), n_classes=10)
    assert sum(isinstance(m, BasicBlock) for m in net.modules()) == blocks
    # He et al. 2016, table 6: ResNet-20 0.27M, ResNet-32 0.46M parameters.
    assert n_parameters(net) == parameters


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (1, 8, 8), (3, 17, 23)])
def test_resnet_maps_uint8_batches_of_any_size_to_logits(shape):
    net = build_model(resnet(8, 4), make_card(shape, n_classes=7)).eval()
    assert net(torch.randint(0, 256, (3, *shape), dtype=torch.uint8)).shape == (3, 7)


def test_width_scales_every_stage():
    narrow = n_parameters(ResNet(resnet(20, 16), (3, 32, 32), n_classes=10))
    wide = n_parameters(ResNet(resnet(20, 32), (3, 32, 32), n_classes=10))
    assert 3.9 < wide / narrow < 4.0  # convolutions grow 4x; only the batchnorms and head grow 2x


@pytest.mark.parametrize("depth", [7, 21, 2])
def test_a_depth_that_is_not_6n_plus_2_names_the_key(depth):
    # Checked once, by the schema: no ResNet can be built from a config with such a depth.
    with pytest.raises(ConfigError) as error:
        compose_config("model=resnet", f"model.depth={depth}")
    assert str(error.value).startswith(f"model.depth={depth}: ") and "6n+2" in str(error.value)
    assert error.value.exit_code == 2


def test_onnx_export_matches_pytorch():
    card = replace(
        make_card((3, 32, 32)), normalization=Normalization([125.0, 123.0, 114.0], [63.0, 62.0, 67.0])
    )
    torch.manual_seed(0)
    net = build_model(resnet(8, 8), card)
    for module in net.modules():  # non-trivial batchnorm statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model = Probabilities(net).eval()
    proto = to_onnx(model, torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), card)
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    parity = check_parity(model, proto, images)
    assert parity["parity_max_abs_diff"] <= 1e-5
    assert parity["parity_argmax_mismatches"] == 0
