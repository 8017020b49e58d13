"""A shared tracking server (`make team-server`): `mlflow server` on PostgreSQL with artifacts
proxied to S3. The pipeline, eight processes at once and the registry commands use it with
nothing but MLFLOW_TRACKING_URI; what they logged is then read back from the database's tables
and the bucket directly, not through MLflow."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tool_env
from tests.scale.conftest import ARTIFACTS_PREFIX, BUCKET, client_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WORKERS = 8
EPOCHS = 20


def run_client(args: list[str], root: Path, url: str) -> subprocess.CompletedProcess:
    """`args` as a team member runs them: in `root`, with only MLFLOW_TRACKING_URI set."""
    done = subprocess.run(
        args, cwd=root, env=client_env(root, url), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def team_pipeline(evaluated_pipeline, team_server, tmp_path_factory) -> Path:
    """A copy of the evaluated pipeline whose tracked stages ran again, into the team server."""
    source, _ = evaluated_pipeline
    root = tmp_path_factory.mktemp("team-pipeline") / "repo"
    shutil.copytree(source, root, symlinks=True)
    run_client(
        ["dvc", "repro", "--force", "--single-item", "train", "export", "evaluate"], root, team_server.url
    )
    return root


def test_the_pipeline_lands_in_postgresql_and_the_bucket(team_pipeline, team_server):
    root = team_pipeline
    run_id = json.loads((root / "models/run.json").read_text())["mlflow_run_id"]
    ((status, experiment_id, artifact_uri),) = team_server.query(
        "SELECT status, experiment_id, artifact_uri FROM runs WHERE run_uuid = :id", id=run_id
    )
    assert status == "FINISHED"
    assert artifact_uri.startswith("mlflow-artifacts:/")  # proxied: a client never talks to S3

    params = dict(team_server.query("SELECT key, value FROM params WHERE run_uuid = :id", id=run_id))
    config = yaml.safe_load((root / "params.yaml").read_text())
    assert params["train.lr"] == str(config["train"]["lr"]) and params["data.name"] == "digits"

    metrics = team_server.query("SELECT key, value, step FROM metrics WHERE run_uuid = :id", id=run_id)
    train = json.loads((root / "metrics/train.json").read_text())
    evaluation = json.loads((root / "metrics/eval.json").read_text())
    epochs = [step for key, _, step in metrics if key == "val_loss"]
    assert len(set(epochs)) == len(epochs) == train["epochs"]
    assert [value for key, value, _ in metrics if key == "test_accuracy"] == [
        pytest.approx(evaluation["accuracy"])
    ]

    run_files = team_server.objects(f"{ARTIFACTS_PREFIX}/{experiment_id}/{run_id}/artifacts/")
    assert {"params.yaml", "model.json"} <= {key.rsplit("/", 1)[1] for key in run_files}
    ((model_id,),) = team_server.query(
        "SELECT model_id FROM logged_models WHERE source_run_id = :id", id=run_id
    )
    (onnx_key,) = [
        key for key in team_server.objects(ARTIFACTS_PREFIX) if model_id in key and key.endswith(".onnx")
    ]
    assert onnx_key.endswith("/model.onnx")
    assert team_server.read(onnx_key) == (root / "models/model.onnx").read_bytes()


def test_the_registry_commands_work_against_it(team_pipeline, team_server, tmp_path, monkeypatch):
    root, url = team_pipeline, team_server.url
    run_client(["imgclf", "register"], root, url)
    promoted = run_client(["imgclf", "promote"], root, url)
    assert "champion" in promoted.stdout
    listed = run_client(["imgclf", "models", "--json"], root, url).stdout
    rows = [json.loads(line) for line in listed.splitlines()]
    assert [(r["version"], r["aliases"], r["gate"]) for r in rows] == [("1", ["champion"], "pass")]
    assert team_server.query("SELECT alias, version FROM registered_model_aliases WHERE name = 'imgclf'") == [
        ("champion", 1)
    ]

    # What `imgclf serve --model models:/imgclf@champion` fetches: the ONNX file, through the server.
    import mlflow.artifacts
    from mlflow import MlflowClient

    for key in [key for key in os.environ if key.startswith("AWS_")]:
        monkeypatch.delenv(key)
    source = MlflowClient(url, registry_uri=url).get_model_version_download_uri("imgclf", "1")
    folder = mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path), tracking_uri=url)
    (onnx_file,) = Path(folder).rglob("*.onnx")
    assert onnx_file.read_bytes() == (root / "models/model.onnx").read_bytes()


# One imgclf-style run per process: created, params and an epoch history and an artifact logged,
# ended FINISHED, by imgclf.tracking.client's own functions. The processes wait for a file to appear, so
# that all eight start logging at once, and all race to create the experiment.
WORKER = """
import sys, time
from pathlib import Path
import mlflow.entities, mlflow.tracking  # imported before the start, which they would blur
from imgclf.tracking import client as tracking
from imgclf.config.compose import compose
from imgclf.config.operations import validate

conf, experiment, worker, epochs, folder = sys.argv[1:]
config = validate(compose([f"tracking.experiment={experiment}"], conf))
folder = Path(folder)
(folder / f"ready-{worker}").touch()
while not (folder / "go").exists():
    time.sleep(0.01)
run_id = tracking.start_run(config, {"worker": worker})
with tracking.run_status(config, run_id, finish=True):
    tracking.log_metric_history(config, run_id, [("loss", 1 / (e + 1), e) for e in range(int(epochs))])
    tracking.log_metrics(config, run_id, {"worker": int(worker)})
    note = folder / f"worker-{worker}.txt"
    note.write_text(worker)
    tracking.log_artifacts(config, run_id, [note], "notes")
print(run_id)
"""


def start_worker(worker: int, experiment: str, folder: Path, url: str) -> subprocess.Popen:
    args = [str(REPO / "conf"), experiment, str(worker), str(EPOCHS), str(folder)]
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, *args],
        cwd=folder,
        env=client_env(REPO, url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_eight_processes_logging_at_once_give_eight_complete_runs(team_server, tmp_path):
    from mlflow import MlflowClient

    from imgclf.config.compose import compose
    from imgclf.config.operations import validate
    from imgclf.config.pipeline import flatten

    experiment = f"concurrency-{uuid.uuid4().hex[:8]}"
    processes = [start_worker(w, experiment, tmp_path, team_server.url) for w in range(WORKERS)]
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("ready-*"))) < WORKERS and time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            break
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outputs = [p.communicate(timeout=300) for p in processes]
    failures = [err for p, (_, err) in zip(processes, outputs, strict=True) if p.returncode]
    assert not failures, failures[0]
    assert all("Traceback" not in err and "ERROR" not in err for _, err in outputs)
    run_ids = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(run_ids) == WORKERS

    client = MlflowClient(team_server.url)
    (experiment_id,) = [e.experiment_id for e in client.search_experiments() if e.name == experiment]
    runs = client.search_runs([experiment_id])
    assert {r.info.run_id for r in runs} == run_ids
    n_params = len(flatten(validate(compose([f"tracking.experiment={experiment}"], REPO / "conf"))))
    for run in runs:
        worker = int(run.data.metrics["worker"])
        assert run.info.status == "FINISHED" and run.data.tags["worker"] == str(worker)
        assert len(run.data.params) == n_params
        assert len(client.get_metric_history(run.info.run_id, "loss")) == EPOCHS
        (note,) = client.list_artifacts(run.info.run_id, "notes")
        assert note.path == f"notes/worker-{worker}.txt"
    # The same, in the database and the bucket themselves.
    ((finished,),) = team_server.query(
        "SELECT count(*) FROM runs WHERE experiment_id = :id AND status = 'FINISHED'", id=int(experiment_id)
    )
    assert finished == WORKERS
    notes = [key for key in team_server.objects(f"{ARTIFACTS_PREFIX}/{experiment_id}/") if "/notes/" in key]
    assert len(notes) == WORKERS


def test_make_team_server_refuses_without_its_stores():
    env = {k: v for k, v in tool_env(REPO).items() if k not in ("BACKEND_URI", "ARTIFACTS_URI")}
    cases = [
        ({}, "make team-server: set BACKEND_URI=postgresql+psycopg2://"),
        ({"BACKEND_URI": "postgresql://me:secret@db/mlflow"}, "must start postgresql+psycopg2://"),
        ({"BACKEND_URI": "postgresql+psycopg2://me@db/mlflow"}, "make team-server: set ARTIFACTS_URI=s3://"),
    ]
    for extra, message in cases:
        done = subprocess.run(
            ["make", "-o", "install", "team-server"],
            cwd=REPO,
            env=env | extra,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2
        (line,) = [line for line in done.stderr.splitlines() if line.startswith("make team-server:")]
        assert message in line and "secret" not in done.stderr


def test_make_team_server_serves_the_same_store(team_server, tmp_path):
    """A second server started by `make team-server` on the same database and bucket (as a team
    runs replicas behind a load balancer) sees what the first one logged, artifacts included."""
    from mlflow import MlflowClient

    first = MlflowClient(team_server.url)
    experiment_id = first.create_experiment(f"replica-{uuid.uuid4().hex[:8]}")
    run_id = first.create_run(experiment_id).info.run_id
    (tmp_path / "hello.txt").write_text("hello")
    first.log_artifact(run_id, str(tmp_path / "hello.txt"))
    first.set_terminated(run_id)

    stores = {"BACKEND_URI": team_server.database, "ARTIFACTS_URI": f"s3://{BUCKET}/{ARTIFACTS_PREFIX}"}
    with make_team_server(stores | team_server.s3, tmp_path / "server.log") as url:
        second = MlflowClient(url)
        assert second.get_run(run_id).info.status == "FINISHED"
        copy = second.download_artifacts(run_id, "hello.txt", str(tmp_path / "copy"))
        assert Path(copy).read_text() == "hello"


@contextlib.contextmanager
def make_team_server(extra_env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`make team-server` on a free port, in its own process group (killed afterwards); its URL."""
    from tests.support.servers import free_port

    port = free_port()
    env = tool_env(REPO) | extra_env | {"SERVER_PORT": str(port)}
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            ["make", "-o", "install", "team-server"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not answers(f"{url}/health"):
                assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
            yield url
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.wait(timeout=20)
                    break


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False
