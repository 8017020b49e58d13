"""Networks. Each takes raw uint8 pixels (N, C, H, W): the first layer applies the normalisation."""

from pathlib import Path

import torch
from pydantic import TypeAdapter
from torch import nn

from imgclf.config import CNNConfig, MLPConfig, ModelConfig, ResNetConfig
from imgclf.models.cnn import CNN
from imgclf.models.mlp import MLP
from imgclf.models.normalization import Normalize
from imgclf.models.resnet import ResNet


def build_model(
    config: MLPConfig | CNNConfig | ResNetConfig,
    input_shape: tuple[int, int, int],
    n_classes: int,
    stats: dict[str, list[float]],
) -> nn.Sequential:
    """`Normalize(stats)` followed by the configured network; outputs logits (N, n_classes)."""
    if isinstance(config, MLPConfig):
        body = MLP(input_shape, config.hidden, n_classes, config.activation, config.dropout)
    elif isinstance(config, CNNConfig):
        body = CNN(input_shape, config.channels, config.hidden, n_classes, config.dropout)
    else:
        body = ResNet(input_shape, config.depth, config.width, n_classes)
    return nn.Sequential(Normalize(stats["mean"], stats["std"]), body)


def build_from_card(card: dict) -> nn.Sequential:
    """Rebuild a network from its card: model config, input shape, classes, normalisation."""
    config = TypeAdapter(ModelConfig).validate_python(card["model"])
    return build_model(config, tuple(card["input_shape"]), len(card["classes"]), card["stats"])


def load_checkpoint(path: Path, prefix: str = "net.") -> tuple[dict, nn.Sequential]:
    """The card and the trained network from a train-stage checkpoint (no Lightning needed)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    card = checkpoint["imgclf"]
    net = build_from_card(card)
    weights = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(weights)
    return card, net


__all__ = ["CNN", "MLP", "Normalize", "ResNet", "build_from_card", "build_model", "load_checkpoint"]
