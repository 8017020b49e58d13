"""The stages' tracking worker: calls made in order against a real sqlite store, failures as one
line, a dead stage's run ended, and stages that import no mlflow (nor torch, where not needed)."""

import json
import signal
import subprocess
import sys
import time

import pytest

from imgclf.config.compose import compose
from imgclf.config.operations import validate
from imgclf.config.pipeline import flatten, validate_pipeline
from imgclf.tracking import client as tracking
from imgclf.tracking.store import StoreError
from imgclf.tracking.worker import Tracker, TrackingError, launched_as_rank_zero
from tests.conftest import REPO, tool_env


@pytest.fixture
def config(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return validate(compose([], REPO / "conf"))


def test_calls_are_made_in_order_against_the_run(config, digits_dirs, tmp_path):
    raw, normalized = digits_dirs
    note = tmp_path / "note.txt"
    note.write_text("hello")
    with Tracker(config) as tracker:
        run = tracker.follow(tracking.open_run, tracker.params, normalized, raw, normalized / "report.json")
        tracker.log(tracking.log_metric_history, [("loss", 0.5, 1), ("loss", 0.25, 2)])
        tracker.log(tracking.log_metrics, {"accuracy": 0.9})
        tracker.log(tracking.log_artifacts, [note], "notes")
        with tracker.run_status():
            run_id = run.result()
    client = tracking.client(config)
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"
    assert [p.value for p in client.get_metric_history(run_id, "loss")] == [0.5, 0.25]
    assert logged.data.metrics["accuracy"] == 0.9
    assert logged.data.tags["data.name"] == "digits" and len(logged.data.tags["data.normalized_sha256"]) == 64
    assert logged.data.params["train.max_epochs"] == str(config.train.max_epochs)  # the whole config
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]


def test_a_run_logs_all_of_params_yaml_though_the_stage_validates_its_sections_only(
    monkeypatch, digits_dirs, tmp_path
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    raw_params = compose([], REPO / "conf")  # what pipelines/train.py reads from params.yaml
    config = validate_pipeline(raw_params)
    raw, normalized = digits_dirs
    with Tracker(config, raw_params) as tracker:
        run_id = tracker.follow(
            tracking.open_run, tracker.params, normalized, raw, normalized / "report.json"
        ).result()
    params = tracking.client(config).get_run(run_id).data.params
    assert params["promote.metric"] == raw_params["promote"]["metric"]
    assert params["sweep.n_trials"] == str(raw_params["sweep"]["n_trials"])
    assert len(params) == len(flatten(raw_params)) > len(flatten(config))


def test_a_run_the_store_lost_is_replaced_on_adopt_and_left_alone_on_use(config, digits_dirs):
    raw, normalized = digits_dirs
    with Tracker(config) as tracker:
        adopted = tracker.follow(tracking.adopt_run, tracker.params, "0" * 32, normalized, raw).result()
    with Tracker(config) as tracker:
        tracker.follow(tracking.existing_run, "f" * 32)  # gone: what follows logs nothing, and does not fail
        tracker.log(tracking.log_metrics, {"x": 1.0})
    client = tracking.client(config)
    (run,) = client.search_runs([tracking.experiment_id(config)])
    assert run.info.run_id == adopted["run_id"] != "0" * 32
    assert adopted["lineage"]["data.name"] == "digits" and "x" not in run.data.metrics


def test_a_store_failure_is_the_stores_one_line(config, tmp_path, monkeypatch):
    store = tmp_path / "broken.db"
    store.write_bytes(b"not a database" * 100)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    tracker = Tracker(config)
    with pytest.raises(TrackingError) as raised:
        tracker.follow(tracking.open_run, None, tmp_path, tmp_path, tmp_path / "report.json").result()
    assert "is damaged" in str(raised.value) and str(store) in str(raised.value)
    assert raised.value.exit_code == StoreError.exit_code and "\n" not in str(raised.value)
    with pytest.raises(TrackingError):  # every later call says so too, and close does
        tracker.log(tracking.log_metrics, {"x": 1.0})
    with pytest.raises(TrackingError):
        tracker.close()


def test_a_call_that_fails_fails_the_stage_and_its_run(config, digits_dirs):
    raw, normalized = digits_dirs
    tracker = Tracker(config)
    run = tracker.follow(tracking.open_run, None, normalized, raw, normalized / "report.json")
    with tracker.run_status():
        tracker.log(tracking.log_metrics, {"bad key!": 1.0})  # MLflow refuses the name
    with pytest.raises(TrackingError) as raised:
        tracker.close()
    assert str(raised.value).startswith("MLflow tracking failed (log_metrics): MlflowException:")
    assert "\n" not in str(raised.value)
    assert tracking.client(config).get_run(run.result()).info.status == "FAILED"


def test_discard_lets_the_worker_go_without_a_run(config):
    tracker = Tracker(config)
    tracker.discard()
    tracker.close()
    with pytest.raises(RuntimeError):
        tracker.log(tracking.log_metrics, {"x": 1.0})
    assert tracking.client(config).search_runs([tracking.experiment_id(config)]) == []


@pytest.mark.parametrize(
    ("environ", "zero"),
    [
        ({}, True),
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
        ({"LOCAL_RANK": "1"}, False),
        ({"NODE_RANK": "2"}, False),
    ],
)
def test_launched_as_rank_zero_reads_the_launchers_variables(environ, zero):
    assert launched_as_rank_zero(environ) is zero


STAGE = """
import os, signal, sys, time
from pathlib import Path
from imgclf.config.compose import compose
from imgclf.config.operations import validate
from imgclf.tracking import client
from imgclf.tracking.worker import Tracker
config = validate(compose([], sys.argv[1]))
tracker = Tracker(config)
with tracker.run_status():
    print(tracker.follow(client.open_run, None, *map(Path, sys.argv[2:5])).result(), flush=True)
    if sys.argv[5] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os.killpg(os.getpgid(0), signal.SIGINT)  # Ctrl-C reaches the whole group, the worker too
    time.sleep(30)
"""


@pytest.mark.parametrize(("how", "status"), [("interrupt", "KILLED"), ("kill", "FAILED")])
def test_a_stage_that_dies_leaves_no_running_run(config, digits_dirs, tmp_path, how, status):
    raw, normalized = digits_dirs
    env = tool_env(REPO) | {"DVC_ROOT": str(tmp_path)}
    args = [str(REPO / "conf"), str(normalized), str(raw), str(normalized / "report.json"), how]
    stage = subprocess.Popen(
        [sys.executable, "-c", STAGE, *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    run_id = stage.stdout.readline().strip()
    stage.wait(timeout=60)
    assert stage.returncode == -signal.SIGKILL if how == "kill" else stage.returncode != 0
    client = tracking.client(config)
    for _ in range(100):  # the worker ends the run when it sees the stage gone
        if client.get_run(run_id).info.status != "RUNNING":
            break
        time.sleep(0.1)
    assert client.get_run(run_id).info.status == status


CHECK_IMPORTS = """
import json, sys
import {module}
print(json.dumps(sorted(name for name in {heavy} if name in sys.modules)))
"""


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        (
            "imgclf.stages.training.stage",
            ["mlflow", "sklearn"],
        ),  # Lightning's torchmetrics imports matplotlib
        ("imgclf.stages.export", ["mlflow", "lightning", "pytorch_lightning", "matplotlib", "sklearn"]),
        ("imgclf.stages.evaluation", ["mlflow", "torch", "lightning", "matplotlib", "sklearn"]),
    ],
)
def test_a_stage_imports_only_what_it_runs(module, absent):
    """What a stage imports costs every run of it: mlflow is the tracking worker's, matplotlib
    too (it draws the PNGs), and scikit-learn is nobody's."""
    code = CHECK_IMPORTS.format(module=module, heavy=absent)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=tool_env(REPO))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


DATA_STAGES = """
import json, sys
from pathlib import Path
from imgclf.config.compose import compose
from imgclf.config.operations import validate
from imgclf.tracking.store import StoreError
from imgclf.data.download import download
from imgclf.data.normalize import normalize
config = validate(compose([], sys.argv[1]))
download(config.data, Path(sys.argv[2]) / "raw")
normalize(config.data, config.seed, Path(sys.argv[2]) / "raw", Path(sys.argv[2]) / "normalized")
heavy = ("sklearn", "scipy", "torch", "mlflow", "matplotlib")
print(json.dumps(sorted(name for name in heavy if name in sys.modules)))
"""


def test_download_and_normalize_of_digits_import_no_heavy_library(tmp_path):
    env = tool_env(REPO) | {"DVC_ROOT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", DATA_STAGES, str(REPO / "conf"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
    assert (tmp_path / "normalized" / "report.json").is_file()
