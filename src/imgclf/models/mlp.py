import math

from torch import nn

from imgclf.config.pipeline import MLPConfig
from imgclf.models.catalog import register_model

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


@register_model("mlp")
class MLP(nn.Sequential):
    """The textbook network: flattened pixels -> hidden layers (activation, dropout) -> logits."""

    def __init__(self, config: MLPConfig, input_shape: tuple[int, int, int], n_classes: int):
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in config.hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[config.activation](), nn.Dropout(config.dropout)]
            width = size
        layers.append(nn.Linear(width, n_classes))
        super().__init__(*layers)
