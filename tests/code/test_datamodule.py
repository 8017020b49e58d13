import functools
import operator

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from imgclf.config.pipeline import AugmentConfig
from imgclf.data.augment import BatchAugment
from imgclf.data.datamodule import ImageDataModule, Shard, TensorBatches


def batches(seed, epochs=2):
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    loader = TensorBatches(images, torch.arange(10), batch_size=4, shuffle=True, seed=seed)
    return [[labels.tolist() for _, labels in loader] for _ in range(epochs)]


def test_each_epoch_sees_every_sample_once_in_a_new_order():
    first, second = batches(seed=0)
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(functools.reduce(operator.iadd, first, [])) == list(range(10))
    assert sorted(functools.reduce(operator.iadd, second, [])) == list(range(10))
    assert first != second


def test_same_seed_gives_same_batches_and_another_seed_does_not():
    assert batches(seed=7) == batches(seed=7)
    assert batches(seed=7) != batches(seed=8)


def test_ddp_processes_share_an_epoch_without_overlap_in_equal_steps():
    images = torch.arange(11, dtype=torch.uint8).view(11, 1, 1, 1)
    shards = [
        TensorBatches(images, torch.arange(11), 2, shuffle=True, seed=3, shard=Shard(rank, 3))
        for rank in range(3)
    ]
    seen = [[label for _, labels in shard for label in labels.tolist()] for shard in shards]
    assert [len(shard) for shard in shards] == [2, 2, 2]  # 11 // 3 = 3 images each, in 2 steps
    assert [len(labels) for labels in seen] == [3, 3, 3]
    dealt = [label for labels in seen for label in labels]
    assert len(set(dealt)) == 9  # disjoint: 2 images of 11 wait for the next epoch
    whole = next(iter(TensorBatches(images, torch.arange(11), 11, shuffle=True, seed=3)))[1].tolist()
    assert sorted(dealt) == sorted(whole[:9])  # the same permutation, dealt out


def test_images_stay_paired_with_their_labels():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    for x, y in TensorBatches(images, torch.arange(10), 3, shuffle=True, seed=1):
        assert x.flatten().tolist() == y.tolist()


def test_datamodule_serves_the_normalized_splits(digits_dirs):
    _, normalized = digits_dirs
    module = ImageDataModule(
        normalized, batch_size=32, seed=0, augment=AugmentConfig(crop_padding=0, hflip=False, invert=False)
    )
    module.setup("fit")
    images, labels = next(iter(module.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (32, 1, 8, 8)
    assert labels.dtype == torch.int64
    assert sum(len(y) for _, y in module.val_dataloader()) == len(module.splits["val"][1])
    assert "test" not in module.splits  # the test split is evaluate's, on the exported model


# --- augmentation ------------------------------------------------------------------------------


def distinct_images(n=64, c=2, h=5, w=6):
    """Images whose every pixel value is unique within the image (1..255), so a shift is visible."""
    base = torch.arange(1, c * h * w + 1, dtype=torch.uint8).view(1, c, h, w)
    return base.repeat(n, 1, 1, 1)


def variants(image, padding, hflip):
    """Every image crop_and_flip may make of `image`."""
    padded = F.pad(image, (padding,) * 4)
    h, w = image.shape[-2:]
    crops = [padded[:, y : y + h, x : x + w] for y in range(2 * padding + 1) for x in range(2 * padding + 1)]
    return crops + [crop.flip(-1) for crop in crops] if hflip else crops


@pytest.mark.parametrize(("padding", "hflip"), [(2, False), (0, True), (1, True)])
def test_each_augmented_image_is_a_padded_crop_or_its_mirror(padding, hflip):
    images = distinct_images()
    out = BatchAugment(AugmentConfig(crop_padding=padding, hflip=hflip, invert=False), seed=0)(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    allowed = variants(images[0], padding, hflip)
    matches = [[i for i, v in enumerate(allowed) if torch.equal(v, image)] for image in out]
    assert all(matches)  # each output is one shift (or mirror) of its input, all channels alike
    assert len({m[0] for m in matches}) > 1  # and 64 draws do not all pick the same one


def test_crop_offsets_span_the_whole_padding():
    images = torch.full((2000, 1, 1, 1), 9, dtype=torch.uint8)
    out = BatchAugment(AugmentConfig(crop_padding=1, hflip=False, invert=False), seed=0)(images)
    # A 1x1 image padded by 1 is a 3x3 window: the pixel survives in 1 of 9 offsets.
    assert 0.08 < (out == 9).float().mean() < 0.14


def test_augmentation_is_seeded_and_new_each_epoch():
    config = AugmentConfig(crop_padding=2, hflip=True, invert=False)
    images = distinct_images()
    first, second = BatchAugment(config, seed=3), BatchAugment(config, seed=3)
    epoch1, epoch2 = first(images), first(images)
    assert torch.equal(epoch1, second(images)) and torch.equal(epoch2, second(images))
    assert not torch.equal(epoch1, epoch2)
    assert not torch.equal(epoch1, BatchAugment(config, seed=4)(images))


def test_no_augmentation_by_default():
    images = distinct_images()
    assert BatchAugment(AugmentConfig(crop_padding=0, hflip=False, invert=False), seed=0)(images) is images


INVERT = AugmentConfig(crop_padding=0, hflip=False, invert=True)


def inverted_mask(images, out):
    """Which outputs are their input inverted (255 - x); every other output must be its input."""
    inverted = (out == 255 - images).flatten(1).all(1)
    assert torch.equal(out[~inverted], images[~inverted])
    return inverted


def test_invert_turns_about_half_the_images_into_their_negative():
    images = distinct_images(n=2000)
    out = BatchAugment(INVERT, seed=0)(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert 0.45 < inverted_mask(images, out).float().mean() < 0.55


def test_invert_is_seeded_and_new_each_epoch():
    images = distinct_images()
    first, second = BatchAugment(INVERT, seed=3), BatchAugment(INVERT, seed=3)
    epoch1, epoch2 = first(images), first(images)
    assert torch.equal(epoch1, second(images)) and torch.equal(epoch2, second(images))
    assert not torch.equal(inverted_mask(images, epoch1), inverted_mask(images, epoch2))
    assert not torch.equal(epoch1, BatchAugment(INVERT, seed=4)(images))


def test_invert_combines_with_crop_and_flip_and_whitens_the_padding():
    images = distinct_images()
    out = BatchAugment(AugmentConfig(crop_padding=1, hflip=True, invert=True), seed=0)(images)
    allowed = variants(images[0], 1, hflip=True)
    plain = [any(torch.equal(v, image) for v in allowed) for image in out]
    negative = [any(torch.equal(255 - v, image) for v in allowed) for image in out]
    assert all(p != n for p, n in zip(plain, negative, strict=True))  # one or the other, never neither
    assert 0 < sum(negative) < len(out)
    shifted = [image for image, n in zip(out, negative, strict=True) if n and (image == 255).any()]
    assert shifted  # a negative that was shifted: its zero padding became white, like its background


class Recorder(L.LightningModule):
    """Keeps the batches the trainer hands to each step."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"].append(batch[0].clone())
        return self.weight.sum()

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append(batch[0].clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_and_record(normalized, augment):
    module = ImageDataModule(normalized, batch_size=16, seed=5, augment=augment)
    recorder = Recorder()
    L.Trainer(
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(recorder, datamodule=module)
    return module, recorder.seen


def test_only_training_batches_are_augmented_and_runs_repeat(digits_dirs):
    _, normalized = digits_dirs
    augment = AugmentConfig(crop_padding=2, hflip=False, invert=False)
    module, seen = fit_and_record(normalized, augment)
    train_images, _ = module.splits["train"]
    plain = [images for images, _ in TensorBatches(train_images, module.splits["train"][1], 16, True, seed=5)]
    assert not torch.equal(seen["train"][0], plain[0])
    allowed = [variants(image, 2, hflip=False) for image in plain[0]]
    assert all(
        any(torch.equal(v, image) for v in vs) for vs, image in zip(allowed, seen["train"][0], strict=True)
    )
    assert all(torch.equal(val, module.splits["val"][0][:1024]) for val in seen["val"])
    _, again = fit_and_record(normalized, augment)
    assert all(torch.equal(a, b) for a, b in zip(seen["train"], again["train"], strict=True))
