import math

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class MLP(nn.Sequential):
    """The textbook network: flattened pixels -> hidden layers (activation, dropout) -> logits."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        hidden: list[int],
        n_classes: int,
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, n_classes))
        super().__init__(*layers)
