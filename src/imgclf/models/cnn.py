from torch import nn

from imgclf.config.pipeline import CNNConfig
from imgclf.errors import ConfigError
from imgclf.models.catalog import register_model


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 conv-batchnorm-relu layers, then a 2x2 max-pool that halves the resolution."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


@register_model("cnn")
class CNN(nn.Sequential):
    """Conv blocks, one per entry of `channels`, then a hidden layer and the logits."""

    def __init__(self, config: CNNConfig, input_shape: tuple[int, int, int], n_classes: int):
        channels, hidden, dropout = config.channels, config.hidden, config.dropout
        in_channels, height, width = input_shape
        if min(height, width) >> len(channels) < 1:
            raise ConfigError(
                f"{len(channels)} conv blocks halve {height}x{width} images below 1 pixel; "
                "use fewer model.channels"
            )
        blocks = []
        for out_channels in channels:
            blocks.append(conv_block(in_channels, out_channels))
            in_channels = out_channels
        features = in_channels * (height >> len(channels)) * (width >> len(channels))
        super().__init__(
            *blocks,
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )
