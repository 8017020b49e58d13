import subprocess

import pytest

from imgclf.config.compose import compose
from imgclf.config.operations import validate
from imgclf.tracking import client as tracking
from tests.conftest import REPO


@pytest.fixture
def config():
    return validate(compose([], REPO / "conf"))


def test_tracking_uri_precedence(config, monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.tracking_uri(config) == f"sqlite:///{tmp_path}/mlflow.db"
    configured = config.model_copy(
        update={"tracking": config.tracking.model_copy(update={"uri": "http://127.0.0.1:1"})}
    )
    assert tracking.tracking_uri(configured) == "http://127.0.0.1:1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert tracking.tracking_uri(configured) == "sqlite:////elsewhere.db"


def test_git_state_reports_commit_and_dirty_flag(tmp_path):
    def git(*args):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-qm", "c")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True
    ).stdout.strip()
    assert tracking.git_state(tmp_path) == {"git.commit": head, "git.dirty": "false"}
    (tmp_path / "dvc.lock").write_text("x")
    git("add", "dvc.lock")
    git("commit", "-qm", "lock")
    (tmp_path / "dvc.lock").write_text("rewritten by the pipeline as stages finish")
    assert tracking.git_state(tmp_path)["git.dirty"] == "false"
    (tmp_path / "f.txt").write_text("b")
    assert tracking.git_state(tmp_path)["git.dirty"] == "true"


def test_folder_hash_follows_content_and_names(tmp_path):
    (tmp_path / "a").write_text("1")
    first = tracking.folder_hash(tmp_path)
    (tmp_path / "a").write_text("2")
    assert tracking.folder_hash(tmp_path) != first
    (tmp_path / "a").write_text("1")
    assert tracking.folder_hash(tmp_path) == first
    (tmp_path / "a").rename(tmp_path / "b")
    assert tracking.folder_hash(tmp_path) != first


def test_start_run_logs_the_whole_flattened_config(config, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    run_id = tracking.start_run(config, {"git.commit": "abc"})
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert run.data.params["model.hidden.1"] == "128"
    assert run.data.params["train.lr"] == "0.002"
    assert len(run.data.params) == len(tracking.flatten(config))
    assert run.data.tags["git.commit"] == "abc"
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert tracking.existing_run(config, run_id) == run_id
    assert tracking.existing_run(config, "0" * 32) is None


def test_data_report_reaches_the_run(config, monkeypatch, tmp_path, digits_dirs):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    _, normalized = digits_dirs
    run_id = tracking.start_run(config, {})
    tracking.log_data_report(config, run_id, normalized / "report.json")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    metrics = client.get_run(run_id).data.metrics
    assert metrics["data.n_train"] + metrics["data.n_val"] + metrics["data.n_test"] == 1797
    assert metrics["data.duplicates.train-test"] >= 0
    assert [a.path for a in client.list_artifacts(run_id, "data")] == ["data/report.json"]
