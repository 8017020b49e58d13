"""Networks. Each takes raw uint8 pixels (N, C, H, W): the first layer applies the normalisation.

Every module of this package is imported here, so that each registers its network
(imgclf.models.catalog); `build_model` then builds the one `model.name` names.

May import: the base, config.pipeline, torch. Never data/, tracking/, registry/, stages/, sweep/,
cli or mlflow (import-linter's contracts in pyproject.toml).
"""

import importlib
import pkgutil
from pathlib import Path
from typing import NamedTuple

import torch
from pydantic import TypeAdapter
from torch import nn

from imgclf.card import ModelCard
from imgclf.config.pipeline import ModelConfig
from imgclf.models.catalog import MODELS
from imgclf.models.normalization import Normalize

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_model(config: ModelConfig, card: ModelCard) -> nn.Sequential:
    """`Normalize` with the card's statistics, then the configured network; logits (N, classes)."""
    body = MODELS[config.name](config, card.input.shape, len(card.classes))
    return nn.Sequential(Normalize(card.normalization.mean, card.normalization.std), body)


class Checkpoint(NamedTuple):
    """What the train stage's checkpoint holds: the card, the network's config, the net. Not the
    MLflow run (models/run.json names it): identical trainings give identical checkpoints."""

    card: ModelCard
    model: ModelConfig
    net: nn.Sequential


def checkpoint_record(card: ModelCard, model: ModelConfig) -> dict:
    """What the train stage stores under "imgclf" in its checkpoint; `load_checkpoint` reads it."""
    return {"card": card.to_json(), "model": model.model_dump()}


def load_checkpoint(path: Path, prefix: str = "net.") -> Checkpoint:
    """The card, config and trained network of a train-stage checkpoint; no Lightning needed."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    record = checkpoint["imgclf"]
    card = ModelCard.from_json(record["card"])
    config = TypeAdapter(ModelConfig).validate_python(record["model"])
    net = build_model(config, card)
    weights = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(weights)
    return Checkpoint(card, config, net)
