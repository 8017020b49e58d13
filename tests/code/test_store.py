"""The MLflow store: created once under a lock, never half-made, and a damaged one named in a line."""

import sqlite3
import subprocess
import sys

import pytest

from imgclf.tracking.store import StoreError, prepare_store
from tests.conftest import REPO, tool_env

OPEN_AND_RUN = """
import sys
from imgclf.tracking import client as tracking
from imgclf.config.compose import compose
from imgclf.config.operations import validate
config = validate(compose([f"tracking.uri=sqlite:///{sys.argv[1]}"], sys.argv[2]))
run_id = tracking.start_run(config, {})
tracking.log_metrics(config, run_id, {"x": 1.0})
print(run_id)
"""


@pytest.mark.parametrize("attempt", [1, 2])
def test_four_processes_opening_a_fresh_store_at_once_all_succeed(tmp_path, attempt):
    db = tmp_path / "mlflow.db"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AND_RUN, str(db), str(REPO / "conf")],
            env=tool_env(REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    assert [code for code, _, _ in results] == [0] * 4, [err[-2000:] for _, _, err in results]
    run_ids = {out.split()[-1] for _, out, _ in results}
    assert len(run_ids) == 4
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT COUNT(*) FROM runs").fetchone() == (4,)
        assert connection.execute("SELECT COUNT(*) FROM experiments WHERE name = 'imgclf'").fetchone() == (1,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlflow.db.lock"]  # no copies left


def test_a_store_left_half_migrated_is_named_in_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32))")
        connection.execute("CREATE TABLE _alembic_tmp_experiments (x INTEGER)")
    before = db.read_bytes()
    with pytest.raises(StoreError) as error:
        prepare_store(f"sqlite:///{db}")
    message = str(error.value)
    assert str(db) in message and "_alembic_tmp_experiments" in message and "mv " in message
    assert "\n" not in message and error.value.exit_code == 1
    assert db.read_bytes() == before  # never touched


def test_a_file_that_is_no_store_is_refused_untouched(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database at all, just some bytes " * 100)
    with pytest.raises(StoreError, match=r"sqlite cannot read it|not an MLflow store"):
        prepare_store(f"sqlite:///{db}")
    assert db.read_bytes().startswith(b"not a database")


def test_a_failed_creation_leaves_no_file(tmp_path, monkeypatch):
    import mlflow.store.tracking.sqlalchemy_store as sqlalchemy_store

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sqlalchemy_store, "SqlAlchemyStore", fail)
    with pytest.raises(StoreError, match="could not create it: disk full"):
        prepare_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db.lock"]


def test_the_latest_schema_revision_is_kept_by_mlflow_version(tmp_path):
    from importlib.metadata import version

    from mlflow.store.db.utils import _get_latest_schema_revision

    from imgclf.tracking.store import _latest_revision

    lock = tmp_path / "mlflow.db.lock"
    lock.write_text("0.0.1 stale-revision\n")  # another MLflow's: computed again, and kept
    assert _latest_revision(lock) == _get_latest_schema_revision()
    assert lock.read_text().split() == [version("mlflow"), _get_latest_schema_revision()]
    lock.write_text(f"{version('mlflow')} cached-revision\n")  # this MLflow's: read, not computed
    assert _latest_revision(lock) == "cached-revision"
