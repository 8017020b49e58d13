import hashlib
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from imgclf.config.compose import compose
from imgclf.config.operations import validate
from imgclf.data.datamodule import TensorBatches
from imgclf.models import build_model
from imgclf.stages.training.callbacks import EpochCurves, MlflowEpochMetrics
from imgclf.stages.training.module import ImageClassifier
from imgclf.stages.training.stage import TrainPaths, train
from imgclf.tracking import client as tracking
from imgclf.tracking.worker import Tracker
from tests.conftest import REPO, make_card, tool_env


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

    raw, normalized = digits_dirs
    params = tmp_path / "params.yaml"
    params.write_text("seed: 42\n")
    config = validate(compose(["train.max_epochs=2"], REPO / "conf"))
    run_ids, outputs = [], []
    for attempt in ("first", "second"):
        out = tmp_path / attempt
        with Tracker(config) as tracker:
            outs = (out / "model.ckpt", out / "train.json", out / "curves.csv")
            paths = TrainPaths(
                params, normalized, raw, *outs, run_record=out / "run.json", local_metrics=out / "local.json"
            )
            metrics = train(config, paths, tracker)
        assert metrics["epochs"] == 2 and 0 < metrics["val_acc"] <= 1
        assert (out / "train.json").is_file() and (out / "curves.csv").read_text().count("\n") == 3
        run = json.loads((out / "run.json").read_text())
        assert run["checkpoint_sha256"] == hashlib.sha256((out / "model.ckpt").read_bytes()).hexdigest()
        assert json.loads((out / "local.json").read_text())["train_seconds"] > 0
        assert "train_seconds" not in json.loads((out / "train.json").read_text())  # timings: not in git
        run_ids.append(run["mlflow_run_id"])
        outputs.append([(out / name).read_bytes() for name in ("model.ckpt", "train.json", "curves.csv")])
    assert run_ids[0] != run_ids[1]
    # Two runs, one result: what DVC hashes into dvc.lock is the same bytes (no run id, no paths).
    assert outputs[0] == outputs[1]
    client = MlflowClient(tracking.tracking_uri(config))
    for run_id in run_ids:
        run = client.get_run(run_id)
        assert run.data.metrics["epochs"] == 2 and run.data.params["train.max_epochs"] == "2"


@pytest.mark.parametrize(
    ("error", "status"), [(KeyboardInterrupt(), "KILLED"), (RuntimeError("boom"), "FAILED")]
)
def test_a_training_that_stops_ends_its_run(config, digits_dirs, tmp_path, monkeypatch, error, status):
    import imgclf.stages.training.stage as training

    def stop(*args, **kwargs):
        raise error

    monkeypatch.setattr(training, "fit", stop)
    raw, normalized = digits_dirs
    outs = (tmp_path / "m.ckpt", tmp_path / "t.json", tmp_path / "c.csv")
    with pytest.raises(type(error)), Tracker(config) as tracker:
        train(config, TrainPaths(tmp_path / "params.yaml", normalized, raw, *outs), tracker)
    client = tracking.client(config)
    (run,) = client.search_runs([tracking.experiment_id(config)])
    assert run.info.status == status
    assert not (tmp_path / "m.ckpt").exists() and not (tmp_path / "t.json").exists()


def test_a_finished_training_run_is_named_tagged_and_has_its_data_set(config, digits_dirs, tmp_path):
    raw, normalized = digits_dirs
    out = tmp_path / "out"
    with Tracker(config) as tracker:
        outs = (out / "m.ckpt", out / "t.json", out / "c.csv", out / "c.png")
        train(config, TrainPaths(tmp_path / "params.yaml", normalized, raw, *outs), tracker)
    client = tracking.client(config)
    (run,) = client.search_runs([tracking.experiment_id(config)])
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("digits-mlp-")  # distinct: the time follows
    assert {"best_val_loss", "best_epoch", "epochs", "tracking_seconds"} <= set(run.data.metrics)
    assert not any(key.startswith("best_best") or key == "best_epochs" for key in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/c.png"} and (out / "c.png").read_bytes().startswith(b"\x89PNG")
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "digits" and len(dataset.dataset.digest) == 16
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_train_appends_each_epoch_to_the_file_the_sweep_asks_for(config, digits_dirs, tmp_path, monkeypatch):
    """The contract between the train stage and `imgclf sweep`'s pruner: one JSON object per
    finished epoch, in the file the environment names, read with the sweep's own reader."""
    import csv

    from imgclf.stages.training import callbacks
    from imgclf.sweep import trials

    assert trials.EPOCH_LOG_ENV == callbacks.EPOCH_LOG_ENV  # spelled twice: the sweep may not import stages
    log = tmp_path / "epochs.jsonl"
    monkeypatch.setenv(trials.EPOCH_LOG_ENV, str(log))
    raw, normalized = digits_dirs
    config = validate(compose(["train.max_epochs=2"], REPO / "conf"))
    outs = (tmp_path / "m.ckpt", tmp_path / "t.json", tmp_path / "c.csv")
    with Tracker(config) as tracker:
        train(config, TrainPaths(tmp_path / "params.yaml", normalized, raw, *outs), tracker)
    epochs = trials.EpochFile(log).read_new()
    assert [epoch["epoch"] for epoch in epochs] == [1, 2]
    assert {"train_loss", "val_loss", "val_acc"} <= set(epochs[0])
    curves = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert [epoch["val_loss"] for epoch in epochs] == [float(row["val_loss"]) for row in curves]


def test_sigterm_stops_a_command_as_ctrl_c_does(tmp_path):
    code = (
        "import os, signal, time\n"
        "from imgclf.errors import run_or_exit\n"
        "def body():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
        "    finally:\n"
        "        print('cleaned up')\n"
        "run_or_exit(body)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=tool_env(REPO)
    )
    assert done.returncode == 130 and "cleaned up" in done.stdout
    assert done.stderr.strip() == "imgclf: interrupted"


def test_a_stage_without_teardown_exits_0_with_its_output_flushed_and_skips_atexit():
    code = (
        "import atexit\n"
        "from imgclf.errors import run_or_exit\n"
        "atexit.register(lambda: print('teardown ran'))\n"
        "run_or_exit(lambda: print('stage output', end=''), teardown=False)\n"
        "print('not reached')\n"
    )
    command = [sys.executable, "-c", code]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=tool_env(REPO))
    assert (done.returncode, done.stdout) == (0, "stage output")


def test_a_run_deleted_in_the_ui_is_not_taken_for_the_pipelines_run(config):
    run_id = tracking.start_run(config, {})
    assert tracking.existing_run(config, run_id) == run_id
    tracking.client(config).delete_run(run_id)
    assert tracking.existing_run(config, run_id) is None


# --- DDP: how many processes, and whether the launch agrees ---------------------------------


def trainer_config(*overrides: str):
    return validate(compose(list(overrides), REPO / "conf")).trainer


def test_trainer_ddp_on_cpu_starts_a_process_per_core_lightning_would_start_one():
    from imgclf.stages.training.launch import processes_per_node

    cores = len(os.sched_getaffinity(0))
    assert processes_per_node(trainer_config("trainer=ddp", "trainer.accelerator=cpu")) == cores
    assert processes_per_node(trainer_config("trainer=ddp", "trainer.devices=3")) == 3
    # `auto` without ddp keeps Lightning's meaning: one process on CPU
    assert processes_per_node(trainer_config("trainer.devices=auto")) == 1


@pytest.mark.parametrize(
    ("overrides", "environ", "error"),
    [
        (
            [],
            {"WORLD_SIZE": "2"},
            "WORLD_SIZE=2 in the environment, but trainer.devices x trainer.num_nodes = 1 x 1 = 1",
        ),
        (
            ["trainer=ddp", "trainer.devices=2", "trainer.num_nodes=2"],
            {"WORLD_SIZE": "2", "NODE_RANK": "0"},
            "WORLD_SIZE=2 in the environment, but trainer.devices x trainer.num_nodes = 2 x 2 = 4",
        ),
        (
            ["trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2"],
            {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
            "LOCAL_WORLD_SIZE=2 in the environment (torchrun --nproc-per-node), but trainer.devices=1",
        ),
        ([], {"NODE_RANK": "1"}, "NODE_RANK=1 in the environment, but trainer.num_nodes=1"),
        (
            ["trainer.num_nodes=2"],
            {"GROUP_RANK": "2"},
            "GROUP_RANK=2 in the environment, but trainer.num_nodes=2",
        ),
        ([], {"WORLD_SIZE": "two"}, "WORLD_SIZE='two' in the environment: expected a whole number"),
    ],
)
def test_a_launch_that_disagrees_with_the_config_is_a_config_error(overrides, environ, error):
    from imgclf.errors import ConfigError
    from imgclf.stages.training.launch import check_launch, processes_per_node

    trainer = trainer_config(*overrides)
    with pytest.raises(ConfigError) as raised:
        check_launch(trainer, processes_per_node(trainer), environ)
    assert str(raised.value).startswith(error)


@pytest.mark.parametrize(
    ("overrides", "environ"),
    [
        ([], {}),
        (["trainer=ddp", "trainer.devices=2"], {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "NODE_RANK": "0"}),
        (["trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2"], {"WORLD_SIZE": "2", "NODE_RANK": "1"}),
        (
            ["trainer=ddp", "trainer.devices=2", "trainer.num_nodes=2"],
            {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"},
        ),
    ],
)
def test_a_launch_that_agrees_with_the_config_passes(overrides, environ):
    from imgclf.stages.training.launch import check_launch, processes_per_node

    trainer = trainer_config(*overrides)
    check_launch(trainer, processes_per_node(trainer), environ)


def test_several_nodes_need_a_number_of_devices_not_auto():
    from imgclf.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"trainer.devices='auto' with trainer.num_nodes=2: set trainer.devices"
    ):
        trainer_config("trainer=ddp", "trainer.num_nodes=2")
