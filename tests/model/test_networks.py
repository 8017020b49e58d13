"""Model tests: shapes, the in-graph normalisation, and behaviour of a trained network."""

import pytest
import torch

from imgclf.errors import ConfigError
from imgclf.models import Normalize, build_model
from imgclf.models.catalog import MODELS
from tests.conftest import REPO, compose_config, make_card

STATS = {"mean": [100.0], "std": [50.0]}
MODEL_CHOICES = sorted(path.stem for path in (REPO / "conf/model").glob("*.yaml"))


def test_every_model_in_conf_is_registered_and_every_registered_model_has_a_config():
    assert sorted(MODELS) == MODEL_CHOICES


@pytest.mark.parametrize("model", MODEL_CHOICES)
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_networks_map_uint8_batches_to_logits(model, shape):
    overrides = {"mlp": [], "cnn": ["model.channels=[8,16]"], "resnet": ["model.depth=8", "model.width=4"]}
    config = compose_config(f"model={model}", *overrides.get(model, []))
    net = build_model(config.model, make_card(shape, n_classes=7)).eval()
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
    config = compose_config("model=cnn", "model.channels=[4,4,4,4]", "model.hidden=8")
    with pytest.raises(ConfigError, match=r"model\.channels"):
        build_model(config.model, make_card((1, 8, 8)))


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_mlp_activation_is_the_configured_one(activation):
    config = compose_config("model.hidden=[4]", f"model.activation={activation}")
    net = build_model(config.model, make_card((1, 2, 2), n_classes=3))
    kinds = {torch.nn.ReLU: "relu", torch.nn.Sigmoid: "sigmoid", torch.nn.Tanh: "tanh"}
    found = {name for kind, name in kinds.items() if any(isinstance(m, kind) for m in net.modules())}
    assert found == {activation}
