"""Class names are the user's folder names, whatever characters they hold: download, normalize,
train, export and evaluate (with its MLflow metrics) and predict all take them as they are."""

import csv
import json

import pytest

from imgclf.data.download import download
from imgclf.data.normalize import normalize
from imgclf.data.normalized import load_card
from imgclf.stages.evaluation import EvalPaths, evaluate
from imgclf.stages.export import ExportPaths, export
from imgclf.stages.training.stage import TrainPaths, train
from imgclf.tracking.worker import Tracker
from tests.conftest import compose_config
from tests.data.test_imagefolder import class_image

pytestmark = pytest.mark.e2e

# MLflow refuses "+", "(" and ":" in metric keys; the last two differ only where MLflow would not.
CLASSES = ["a+b", "cats (tabby)", "été: ünïcode", "été? ünïcode"]


def test_any_folder_name_works_end_to_end(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    folder = tmp_path / "photos"
    for label, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        for i in range(12):
            class_image(label % 3, i + 8 * (label // 3)).save(folder / name / f"{i}.png")
    config = compose_config(
        "data=imagefolder",
        f"data.path={folder}",
        "data.image_size=[8,8]",
        "data.workers=1",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.max_epochs=2",
    )
    raw, normalized, models, out = (
        tmp_path / "raw",
        tmp_path / "normalized",
        tmp_path / "models",
        tmp_path / "out",
    )
    download(config.data, raw)
    normalize(config.data, config.seed, raw, normalized)
    assert list(load_card(normalized).classes) == CLASSES
    (tmp_path / "params.yaml").write_text("seed: 42\n")
    params, checkpoint = tmp_path / "params.yaml", models / "model.ckpt"
    onnx, sidecar, run_file = models / "model.onnx", models / "model.json", models / "run.json"
    with Tracker(config) as tracker:  # one per stage, as each stage script starts its own
        paths = TrainPaths(
            params, normalized, raw, checkpoint, out / "t.json", out / "c.csv", run_record=run_file
        )
        train(config, paths, tracker)
    with Tracker(config) as tracker:
        export(
            config,
            ExportPaths(params, checkpoint, normalized, raw, onnx, sidecar, run_record=run_file),
            tracker,
        )
    with Tracker(config) as tracker:
        paths = EvalPaths(params, onnx, sidecar, normalized, out / "eval.json", out, run_record=run_file)
        metrics = evaluate(config, paths, tracker)

    assert json.loads((models / "model.json").read_text())["classes"] == CLASSES
    assert [row["class"] for row in csv.DictReader((out / "per_class.csv").open())] == CLASSES
    run = MlflowClient(store).get_run(json.loads(run_file.read_text())["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == metrics["accuracy"]
    recall_keys = sorted(key for key in run.data.metrics if key.startswith("test_recall/"))
    assert len(recall_keys) == len(CLASSES)  # no two names collapsed into one key

    from imgclf.serving.model import ServedModel

    served = ServedModel.load(str(models / "model.onnx"))
    assert list(served.card.classes) == CLASSES
