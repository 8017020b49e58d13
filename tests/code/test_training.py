import os

import lightning as L
import pytest
import torch

from imgclf import tracking
from imgclf.config import compose, validate
from imgclf.data.datamodule import TensorBatches
from imgclf.models import build_model
from imgclf.training import RUN_ID_ENV, EpochCurves, ImageClassifier, MlflowEpochMetrics, train
from tests.conftest import REPO, make_card


@pytest.fixture
def config(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return validate(compose(["train.max_epochs=3"], REPO / "conf"))


def fit_tiny(config, flush_seconds: float) -> tuple[str, list[list[tuple[str, float, int]]]]:
    """Three epochs of the default MLP on random 8x8 images, tracked into a real sqlite store."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 1, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (96,), generator=generator)
    net = build_model(config.model, make_card((1, 8, 8)))
    run_id = tracking.start_run(config, {})
    writes = []

    def write(points):
        writes.append(points)
        tracking.log_metric_history(config, run_id, points)

    curves = EpochCurves()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[curves, MlflowEpochMetrics(curves, write, flush_seconds)],
    )
    trainer.fit(
        ImageClassifier(net, config.train),
        TensorBatches(images, labels, 32, shuffle=True),
        TensorBatches(images, labels, 32, shuffle=False),
    )
    return run_id, writes


def test_epoch_metrics_reach_mlflow_in_one_batch_at_the_end(config):
    from mlflow.tracking import MlflowClient

    run_id, writes = fit_tiny(config, flush_seconds=3600)
    assert len(writes) == 1  # no store write inside the training loop
    history = MlflowClient(tracking.tracking_uri(config)).get_metric_history(run_id, "val_loss")
    assert sorted(point.step for point in history) == [1, 2, 3]
    assert {key for key, _, _ in writes[0]} == {"train_loss", "train_acc", "val_loss", "val_acc", "lr"}


def test_flush_seconds_zero_writes_every_epoch(config):
    _, writes = fit_tiny(config, flush_seconds=0)
    assert [sorted({step for _, _, step in points}) for points in writes] == [[1], [2], [3]]


def test_client_leaves_the_process_tracking_uri_alone(config):
    tracking.client(config)
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_train_twice_in_one_process_opens_two_runs_and_leaks_nothing(config, digits_dirs, tmp_path):
    """The real train entry with tiny settings: checkpoint, metrics and curves, a run per call."""
    from mlflow.tracking import MlflowClient

    from imgclf.models import load_checkpoint

    raw, normalized = digits_dirs
    params = tmp_path / "params.yaml"
    params.write_text("seed: 42\n")
    config = validate(compose(["train.max_epochs=2"], REPO / "conf"))
    run_ids = []
    for attempt in ("first", "second"):
        out = tmp_path / attempt
        metrics = train(
            config, normalized, raw, params, out / "model.ckpt", out / "train.json", out / "curves.csv", None
        )
        assert metrics["epochs"] == 2 and 0 < metrics["val_acc"] <= 1
        assert (out / "train.json").is_file() and (out / "curves.csv").read_text().count("\n") == 3
        assert RUN_ID_ENV not in os.environ  # the hand-over to DDP workers ends with the training
        run_ids.append(load_checkpoint(out / "model.ckpt").mlflow_run_id)
    assert run_ids[0] != run_ids[1]
    client = MlflowClient(tracking.tracking_uri(config))
    for run_id in run_ids:
        run = client.get_run(run_id)
        assert run.data.metrics["best_epochs"] == 2 and run.data.params["train.max_epochs"] == "2"
