"""Every recipe in conf/experiment/, on generated data in its data set's published format:
download, normalize, train and export for real, through the stages' own functions, with the
recipe's model and augmentation. The real data sets cannot be fetched in tests.
"""

import hashlib

import pytest
import yaml

from imgclf.data.download import download
from imgclf.data.fetch import RemoteFile
from imgclf.data.normalize import normalize
from imgclf.data.normalized import load_split
from imgclf.data.sources import cifar10, idx
from imgclf.stages.export import ExportPaths, export
from imgclf.stages.training.stage import TrainPaths, train
from imgclf.tracking.worker import Tracker
from tests.code.test_config import RECIPES
from tests.conftest import compose_config
from tests.data.test_cifar_source import cifar_archive
from tests.data.test_idx_source import generated_idx

pytestmark = pytest.mark.e2e

PUBLISHED = {
    "mnist": idx.MNIST_FILES,
    "fashion_mnist": idx.FASHION_MNIST_FILES,
    "cifar10": cifar10.CIFAR10_FILES,
}


def generated_files(data: str) -> dict[str, bytes]:
    """Enough images for normalize's stratified validation split to hold every class."""
    if data == "cifar10":
        return {cifar10.CIFAR10_ARCHIVE: cifar_archive(per_batch=30)[0]}
    return generated_idx(n_train=200, n_test=20, size=(28, 28))[1]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_and_exports_on_generated_data(recipe, tmp_path, monkeypatch):
    """The stages' own entry points, with the recipe's model, data format and augmentation;
    one epoch on a few hundred generated images."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = RECIPES[recipe][0]
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, body in generated_files(data).items():
        (mirror / name).write_bytes(body)
        published = RemoteFile(name, sha256=hashlib.sha256(body).hexdigest())
        monkeypatch.setitem(PUBLISHED[data], name, published)
    config = compose_config(
        f"experiment={recipe}",
        f"data.mirrors=[{mirror.as_uri()}/]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "trainer=cpu",
        "train.max_epochs=1",
    )
    raw, normalized, models = tmp_path / "raw" / data, tmp_path / "normalized", tmp_path / "models"
    download(config.data, raw)
    normalize(config.data, config.seed, raw, normalized)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(config.model_dump()))
    with Tracker(config) as tracker:
        checkpoint, outs = models / "model.ckpt", (tmp_path / "train.json", tmp_path / "curves.csv")
        metrics = train(config, TrainPaths(params, normalized, raw, checkpoint, *outs), tracker)
    assert metrics["epochs"] == 1

    with Tracker(config) as tracker:
        onnx, sidecar_out = models / "model.onnx", models / "model.json"
        sidecar, _ = export(
            config, ExportPaths(params, models / "model.ckpt", normalized, raw, onnx, sidecar_out), tracker
        )
    assert sidecar["model"]["name"] == RECIPES[recipe][1]
    assert sidecar["export"]["parity_argmax_mismatches"] == 0
    assert sidecar["input"]["shape"] == ["batch", *load_split(normalized, "test")[0].shape[1:]]
