"""The CIFAR ResNet of He et al. 2016 ("Deep Residual Learning", section 4.2).

A 3x3 stem, then three stages of n basic blocks with width, 2x width and 4x width channels (the
2nd and 3rd stages halve the resolution), global average pooling and one linear layer:
depth = 6n + 2 weighted layers, so ResNet-20 has n = 3 and about 0.27M parameters.
Shortcuts are the paper's option A (identity; subsample and zero-pad channels where the shape
changes), which adds no parameters and is what its CIFAR results used.
"""

import torch
from torch import nn
from torch.nn import functional as F

from imgclf.config.pipeline import ResNetConfig
from imgclf.models.catalog import register_model


class PadShortcut(nn.Module):
    """Option A: keep every `stride`-th pixel and pad the new channels with zeros."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus the shortcut, then relu."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        reshapes = stride != 1 or in_channels != out_channels
        self.shortcut = PadShortcut(in_channels, out_channels, stride) if reshapes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@register_model("resnet")
class ResNet(nn.Sequential):
    def __init__(self, config: ResNetConfig, input_shape: tuple[int, int, int], n_classes: int):
        width = config.width
        blocks_per_stage = (config.depth - 2) // 6  # the schema allows only depths of 6n+2
        layers: list[nn.Module] = [
            nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        in_channels = width
        for stage, out_channels in enumerate([width, 2 * width, 4 * width]):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_channels, out_channels, stride))
                in_channels = out_channels
        super().__init__(
            *layers,
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_channels, n_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # He initialisation, as in the paper
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
