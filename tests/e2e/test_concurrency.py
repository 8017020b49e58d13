"""Pipelines at the same time, as users run them: a queued sweep with two workers on a fresh clone,
and two clones sharing one MLflow sqlite store. Every run succeeds and the store stays whole."""

import json
import sqlite3
import subprocess
import time

import pytest

from tests.conftest import copy_repo, run, tool_env

pytestmark = pytest.mark.e2e


def test_a_queued_sweep_with_two_workers_on_a_fresh_clone(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("sweep"))
    run(["dvc", "exp", "run", "--queue", "-S", "train.lr=0.001,0.01", "-S", "train.max_epochs=3"], repo)
    run(["dvc", "queue", "start", "-j", "2"], repo)
    deadline = time.monotonic() + 900
    while True:
        status = run(["dvc", "queue", "status"], repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert status.count("Success") == 2, status
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    experiments = [rev for row in shown for exp in row.get("experiments") or [] for rev in exp["revs"]]
    assert len(experiments) == 2
    lrs = sorted(rev["data"]["params"]["params.yaml"]["data"]["train"]["lr"] for rev in experiments)
    assert lrs == [0.001, 0.01]
    for rev in experiments:
        assert rev["data"]["metrics"]["metrics/eval.json"]["data"]["accuracy"] > 0.5
    with sqlite3.connect(repo / "mlflow.db") as store:
        statuses = [row[0] for row in store.execute("SELECT status FROM runs")]
    assert statuses == ["FINISHED", "FINISHED"]


def test_two_clones_sharing_one_sqlite_store_run_at_once(tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "shared.db"
    clones = [copy_repo(tmp_path_factory.mktemp(f"clone{i}")) for i in range(2)]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    processes = [
        subprocess.Popen(
            ["dvc", "repro"],
            cwd=clone,
            env=tool_env(clone) | env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for clone in clones
    ]
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [out[-3000:] for out in outputs]
    with sqlite3.connect(store) as connection:
        runs = connection.execute("SELECT status FROM runs").fetchall()
        experiments = connection.execute("SELECT name FROM experiments WHERE name = 'imgclf'").fetchall()
    assert runs == [("FINISHED",), ("FINISHED",)] and len(experiments) == 1
    for clone in clones:  # each clone's model names its own run in the shared store
        run_id = json.loads((clone / "models/run.json").read_text())["mlflow_run_id"]
        with sqlite3.connect(store) as connection:
            assert connection.execute(
                "SELECT COUNT(*) FROM runs WHERE run_uuid = ?", (run_id,)
            ).fetchone() == (1,)
