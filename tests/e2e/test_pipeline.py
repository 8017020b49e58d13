"""The whole pipeline, for real: `dvc repro` on digits in a copy of this repo.

Tests in this module share one copy and run in order: each later one changes the workspace.
"""

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml

from imgclf.export import Probabilities
from imgclf.models import load_checkpoint
from imgclf.runtime import inference_session
from tests.conftest import copy_repo, run

pytestmark = pytest.mark.e2e

STAGES = ["download", "normalize", "train", "export", "evaluate"]


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = copy_repo(tmp_path_factory.mktemp("pipeline"))
    done = run(["dvc", "repro"], root)
    assert stages_run(done.stdout) == STAGES
    shutil.copy(root / "models/model.onnx", root.parent / "first_model.onnx")
    return root


@pytest.fixture(scope="module")
def mlflow_run(repo):
    from mlflow.tracking import MlflowClient

    sidecar = json.loads((repo / "models/model.json").read_text())
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    return client, client.get_run(sidecar["lineage"]["mlflow_run_id"])


def test_default_config_reaches_097_test_accuracy(repo):
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert metrics["accuracy"] >= 0.97
    assert metrics["n_test"] == 270
    assert set(metrics["per_class"]) == {str(d) for d in range(10)}
    assert metrics["latency_ms_p50_b1"] > 0 and metrics["throughput_b256"] > 0
    confusion = (repo / "plots/confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 271


def test_mlflow_run_has_params_epoch_metrics_tags_and_model(repo, mlflow_run, monkeypatch):
    client, mlflow_run_ = mlflow_run
    data = mlflow_run_.data
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert data.params["model.hidden.0"] == str(params["model"]["hidden"][0])
    assert data.params["train.lr"] == str(params["train"]["lr"])
    assert data.params["data.name"] == "digits"

    epochs = json.loads((repo / "metrics/train.json").read_text())["epochs"]
    history = client.get_metric_history(mlflow_run_.info.run_id, "val_loss")
    assert len(history) == epochs > 1
    assert data.metrics["test_accuracy"] >= 0.97
    assert "parity_max_abs_diff" in data.metrics

    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert data.tags["git.commit"] == head
    assert data.tags["git.dirty"] == "false"
    assert len(data.tags["data.normalized_sha256"]) == 64

    artifacts = {a.path for a in client.list_artifacts(mlflow_run_.info.run_id)}
    assert {"params.yaml", "train.json", "eval.json", "model.json", "plots"} <= artifacts
    models = client.search_logged_models(experiment_ids=[mlflow_run_.info.experiment_id])
    assert [m.source_run_id for m in models] == [mlflow_run_.info.run_id]

    import mlflow.pyfunc

    # Not mlflow.set_tracking_uri: it would point every later test's MLflow calls at this store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo}/mlflow.db")
    served = mlflow.pyfunc.load_model(models[0].model_uri)
    images = np.load(repo / "data/normalized/test/images.npy")[:5]
    expected = inference_session(repo / "models/model.onnx").run(None, {"image": images})[0]
    np.testing.assert_allclose(served.predict(images)["probabilities"], expected, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 17])
def test_onnx_matches_the_checkpoint(repo, batch):
    net = load_checkpoint(repo / "models/model.ckpt").net
    images = np.load(repo / "data/normalized/test/images.npy")[:batch]
    with torch.inference_mode():
        expected = Probabilities(net).eval()(torch.from_numpy(images)).numpy()
    actual = inference_session(repo / "models/model.onnx").run(None, {"image": images})[0]
    assert np.abs(actual - expected).max() <= 1e-4
    assert (actual.argmax(1) == expected.argmax(1)).all()


def test_repro_writes_nothing_undeclared_and_a_second_repro_runs_nothing(repo):
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], repo).stdout
    assert [line[3:] for line in status.splitlines()] == ["dvc.lock"]
    assert not list(repo.rglob("lightning_logs")) and not list(repo.rglob(".hydra"))
    assert not (repo / "outputs").exists() and not (repo / "mlruns").exists()
    assert stages_run(run(["dvc", "repro"], repo).stdout) == []


def stage_command(repo, stage: str) -> list[str]:
    """A stage's `cmd:` from dvc.yaml, as DVC runs it for the default data set."""
    cmd = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    return cmd.replace("${data.name}", "digits").split()


def test_bad_value_in_params_stops_a_stage_before_any_work(repo):
    params = repo / "params.yaml"
    good = params.read_text()
    before = {p: sha256(p) for p in (repo / "models").iterdir()}
    params.write_text(good.replace("batch_size: 64", "batch_size: lots"))
    try:
        done = run(stage_command(repo, "train"), repo, check=False)
    finally:
        params.write_text(good)
    assert done.returncode == 2
    assert done.stderr.strip() == "imgclf: error: train.batch_size='lots': Input should be a valid integer"
    assert {p: sha256(p) for p in (repo / "models").iterdir()} == before

    done = run(["imgclf", "params", "train.batch_size=lots"], repo, check=False)
    assert done.returncode == 2 and params.read_text() == good


def test_changing_lr_reruns_exactly_train_export_evaluate(repo):
    run(["imgclf", "params", "train.lr=0.003"], repo)
    done = run(["dvc", "repro"], repo)
    assert stages_run(done.stdout) == ["train", "export", "evaluate"]
    assert json.loads((repo / "metrics/eval.json").read_text())["accuracy"] >= 0.9


def test_two_clean_runs_give_the_same_model_bytes(repo, tmp_path_factory):
    first = repo.parent / "first_model.onnx"
    other = copy_repo(tmp_path_factory.mktemp("again"))
    run(["dvc", "repro"], other)
    assert sha256(other / "models/model.onnx") == sha256(first)


def test_dvc_exp_run_composes_overrides(repo):
    done = run(
        ["dvc", "exp", "run", "-S", "model=cnn", "-S", "train.lr=0.01", "-S", "train.max_epochs=2"],
        repo,
    )
    assert stages_run(done.stdout) == ["train", "export", "evaluate"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["model"]["name"] == "cnn" and params["train"]["lr"] == 0.01
    sidecar = json.loads((repo / "models/model.json").read_text())
    assert sidecar["model"]["name"] == "cnn"
    assert sidecar["lineage"]["dvc.exp_name"]


@pytest.mark.parametrize(
    ("path", "reruns"),
    [
        ("src/imgclf/data/normalize.py", ["normalize"]),  # same splits out: no retraining
        ("src/imgclf/evaluation.py", ["evaluate"]),  # the latency measurement: no re-export
    ],
)
def test_editing_one_stages_code_reruns_that_stage_only(repo, path, reruns):
    file = repo / path
    original = file.read_text()
    file.write_text(original + "\n# an edit that changes no behaviour\n")
    try:
        assert stages_run(run(["dvc", "repro"], repo).stdout) == reruns
    finally:
        file.write_text(original)
    run(["dvc", "repro"], repo)
