"""Every recipe in conf/experiment/, on generated data in its data set's published format:
download and normalize for real, a few training steps of its model with its augmentation,
and an ONNX export that matches PyTorch. The real data sets cannot be fetched in tests.
"""

import hashlib

import lightning as L
import pytest
import torch

from imgclf.config import compose, validate
from imgclf.data import sources
from imgclf.data.datamodule import ImageDataModule
from imgclf.data.download import download
from imgclf.data.fetch import RemoteFile
from imgclf.data.normalize import load_split, normalize
from imgclf.export import Probabilities, check_parity, to_onnx
from imgclf.models import build_from_card
from imgclf.training import ImageClassifier, network_card
from tests.code.test_config import RECIPES
from tests.conftest import REPO
from tests.data.test_cifar_source import cifar_archive
from tests.data.test_idx_source import generated_idx

pytestmark = pytest.mark.e2e

PUBLISHED = {
    "mnist": sources.MNIST_FILES,
    "fashion_mnist": sources.FASHION_MNIST_FILES,
    "cifar10": sources.CIFAR10_FILES,
}


def generated_files(data: str) -> dict[str, bytes]:
    """Enough images for normalize's stratified validation split to hold every class."""
    if data == "cifar10":
        return {sources.CIFAR10_ARCHIVE: cifar_archive(per_batch=30)[0]}
    return generated_idx(n_train=200, n_test=20, size=(28, 28))[1]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_and_exports_on_generated_data(recipe, tmp_path, monkeypatch):
    data = RECIPES[recipe][0]
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, body in generated_files(data).items():
        (mirror / name).write_bytes(body)
        published = RemoteFile(name, sha256=hashlib.sha256(body).hexdigest())
        monkeypatch.setitem(PUBLISHED[data], name, published)
    overrides = [
        f"experiment={recipe}",
        f"data.mirrors=[{mirror.as_uri()}/]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "trainer=cpu",
    ]
    config = validate(compose(overrides, REPO / "conf"))
    normalized = tmp_path / "normalized"
    normalize(config.data, config.seed, download(config.data, tmp_path / "raw"), normalized)

    datamodule = ImageDataModule(
        normalized, config.train.batch_size, config.seed, augment=config.train.augment
    )
    datamodule.setup("fit")
    card = network_card(config, normalized, tuple(datamodule.splits["train"][0].shape[1:]))
    module = ImageClassifier(build_from_card(card), config.train, card)
    L.Trainer(
        fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    ).fit(module, datamodule=datamodule)

    model = Probabilities(module.net).eval()
    images, _ = load_split(normalized, "test")
    proto = to_onnx(model, torch.from_numpy(images[:2]), card)
    assert check_parity(model, proto, images)["parity_argmax_mismatches"] == 0
