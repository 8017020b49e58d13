import torch
from torch import nn


class Normalize(nn.Module):
    """uint8 pixels -> float32 standardised per channel with the train split's mean and std.

    Living inside the network, the normalisation is exported into the ONNX graph, so no server
    or client can ever preprocess differently from training.
    """

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"bad normalisation stats: mean={mean}, std={std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.to(torch.float32) - self.mean) / self.std
