import functools
import operator

import torch

from imgclf.data.datamodule import ImageDataModule, TensorBatches


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


def test_images_stay_paired_with_their_labels():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    for x, y in TensorBatches(images, torch.arange(10), 3, shuffle=True, seed=1):
        assert x.flatten().tolist() == y.tolist()


def test_datamodule_serves_the_normalized_splits(digits_dirs):
    _, normalized = digits_dirs
    module = ImageDataModule(normalized, batch_size=32, seed=0)
    module.setup("fit")
    images, labels = next(iter(module.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (32, 1, 8, 8)
    assert labels.dtype == torch.int64
    assert sum(len(y) for _, y in module.val_dataloader()) == len(module.splits["val"][1])
