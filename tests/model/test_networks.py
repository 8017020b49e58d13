"""Model tests: shapes, the in-graph normalisation, and behaviour of a trained network."""

import pytest
import torch

from imgclf.config import CNNConfig, MLPConfig
from imgclf.errors import ConfigError
from imgclf.models import Normalize, build_model

STATS = {"mean": [100.0], "std": [50.0]}


@pytest.mark.parametrize(
    "config",
    [
        MLPConfig(name="mlp", hidden=[32, 16], activation="tanh"),
        MLPConfig(name="mlp", hidden=[], activation="sigmoid"),
        CNNConfig(name="cnn", channels=[8, 16], hidden=32),
    ],
)
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_networks_map_uint8_batches_to_logits(config, shape):
    stats = {"mean": [100.0] * shape[0], "std": [50.0] * shape[0]}
    net = build_model(config, shape, n_classes=7, stats=stats).eval()
    pixels = torch.randint(0, 256, (5, *shape), dtype=torch.uint8)
    assert net(pixels).shape == (5, 7)


def test_normalize_standardises_raw_pixels():
    layer = Normalize(STATS["mean"], STATS["std"])
    pixels = torch.tensor([0, 100, 200], dtype=torch.uint8).view(1, 1, 1, 3)
    assert layer(pixels).flatten().tolist() == [-2.0, 0.0, 2.0]


def test_bad_stats_are_refused():
    with pytest.raises(ValueError, match="std"):
        Normalize([1.0], [0.0])


def test_too_many_conv_blocks_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.channels"):
        build_model(CNNConfig(name="cnn", channels=[4, 4, 4, 4], hidden=8), (1, 8, 8), 10, STATS)


def test_mlp_activation_is_the_configured_one():
    net = build_model(MLPConfig(name="mlp", hidden=[4], activation="tanh"), (1, 2, 2), 3, STATS)
    assert any(isinstance(m, torch.nn.Tanh) for m in net.modules())
    assert not any(isinstance(m, torch.nn.ReLU) for m in net.modules())
