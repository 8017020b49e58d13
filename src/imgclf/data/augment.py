"""Seeded augmentation of whole uint8 batches, on whatever device the batch is on.

Random crop with zero padding and horizontal flip, as in the CIFAR ResNet paper, done as one
gather per batch: a per-sample Python loop (or torchvision's per-image transforms) would cost
more than the training step itself on small images. Inversion (255 - pixels) of a random half
teaches a model ink of both polarities: a digits model otherwise reads only light ink on dark.
"""

import torch
from torch.nn import functional as F

from imgclf.config.pipeline import AugmentConfig


def crop_and_flip(
    images: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Pad (N, C, H, W) by `padding` zero pixels, crop back to H x W at a random offset per image,
    and mirror a random half of the images left-right when `hflip`."""
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4) if padding else images
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator, device=device)
    cols = torch.arange(w, device=device).expand(n, w)
    if hflip:
        mirrored = torch.randint(0, 2, (n, 1), generator=generator, device=device).bool()
        cols = torch.where(mirrored, cols.flip(1), cols)
    rows = dy + torch.arange(h, device=device)  # (N, H): the source row of each output row
    cols = dx + cols  # (N, W)
    return padded[
        torch.arange(n, device=device).view(n, 1, 1, 1),
        torch.arange(c, device=device).view(1, c, 1, 1),
        rows.view(n, 1, h, 1),
        cols.view(n, 1, 1, w),
    ]


def invert_half(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """255 - pixels for a random half of the (N, C, H, W) uint8 images, all channels alike."""
    n = images.shape[0]
    inverted = torch.randint(0, 2, (n, 1, 1, 1), generator=generator, device=images.device).bool()
    return torch.where(inverted, 255 - images, images)


class BatchAugment:
    """The configured augmentation with its own random stream, seeded once.

    Each call draws new offsets, so each epoch sees new variants; the same seed replays the same
    sequence. The generator lives on the batches' device (a CPU generator cannot drive CUDA).
    """

    def __init__(self, config: AugmentConfig, seed: int):
        self.config, self.seed = config, seed
        self.generator: torch.Generator | None = None

    @property
    def active(self) -> bool:
        return self.config.crop_padding > 0 or self.config.hflip or self.config.invert

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return images
        if self.generator is None or self.generator.device != images.device:
            self.generator = torch.Generator(device=images.device).manual_seed(self.seed)
        if self.config.crop_padding > 0 or self.config.hflip:
            images = crop_and_flip(images, self.config.crop_padding, self.config.hflip, self.generator)
        if self.config.invert:
            # After the crop, so that an inverted image's padding turns white like its background.
            images = invert_half(images, self.generator)
        return images
