"""Where the MLflow store is: one rule for the pipeline (imgclf.tracking.client) and for serving.

Plain Python, without the config schema or mlflow (imported only to create a store), so that
`imgclf predict` and `imgclf serve` can use it and still start fast.
"""

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from imgclf.errors import ImgclfError

MLFLOW_DB = "mlflow.db"


def repo_root(start: Path | None = None) -> Path:
    """DVC_ROOT when DVC runs us; else the nearest folder above `start` with a .dvc/ or .git/."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return start


def default_tracking_uri() -> str:
    """The repo's own store: sqlite:///<repo root>/mlflow.db, an absolute path."""
    return f"sqlite:///{repo_root() / MLFLOW_DB}"


def resolve_tracking_uri(configured: str | None) -> str:
    """MLFLOW_TRACKING_URI, else `configured` (the config's tracking.uri), else the repo's store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or default_tracking_uri()


class StoreError(ImgclfError):
    """The store cannot be created, migrated or read: one line naming the file and what to do."""


class StoreBusy(StoreError):
    """Another process holds the store's lock for too long: retry."""

    exit_code = 3


ARTIFACTS_DIR = "mlartifacts"  # beside a sqlite store: where its runs' artifacts go
LOCK_TIMEOUT_S = 300  # a store is created in seconds; waiting longer means a stuck process
_prepared: set[str] = set()


def prepare_store(uri: str) -> None:
    """Create or migrate a sqlite store once, under a lock, before anything else opens it.

    MLflow creates and migrates a sqlite file in place, with no lock: processes opening a fresh
    store at once (a queued sweep, two clones sharing a file) race on its tables, and an
    interrupted migration leaves the file broken for good. Here one process at a time builds the
    store in a copy beside it and renames the copy into place, so the file is always either
    absent, or an old complete store, or a new complete one. Other URIs are the server's business.
    """
    if not uri.startswith("sqlite:///") or uri in _prepared:
        return
    path = Path(uri.removeprefix("sqlite:///"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(path.name + ".lock")
        with _exclusive(lock, path):
            state = _schema_state(path, lock)
            if state != "current":
                _build(path, migrate=state == "old")
    except OSError as error:  # a read-only folder, a full disk
        raise StoreError(f"MLflow store {path}: {error.strerror or error}") from None
    _prepared.add(uri)


@contextmanager
def _exclusive(lock_path: Path, store: Path) -> Iterator[None]:
    with lock_path.open("a") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreBusy(
                        f"MLflow store {store}: another process has held {lock_path} for "
                        f"{LOCK_TIMEOUT_S} s; run again when it is done"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _schema_state(path: Path, lock: Path) -> str:
    """'missing', 'current' or 'old' (an older MLflow's schema); StoreError if damaged."""
    if not path.exists() or path.stat().st_size == 0:
        return "missing"
    try:
        # Read-write: a writer killed mid-transaction leaves a journal that opening rolls back.
        with closing(sqlite3.connect(path)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
            if leftovers:
                raise _damaged(path, f"a migration was interrupted (table {leftovers[0]} is left over)")
            if "alembic_version" not in tables:
                raise _damaged(path, "it is not an MLflow store (no alembic_version table)")
            version = db.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.DatabaseError as error:
        raise _damaged(path, f"sqlite cannot read it ({error})") from None
    return "current" if version and version[0] == _latest_revision(lock) else "old"


def _latest_revision(lock: Path) -> str:
    """The schema revision this MLflow creates. Alembic finds it by loading every migration script
    (0.5 s), so it is kept in the store's lock file, by MLflow version, for the next process."""
    from importlib.metadata import version

    installed = version("mlflow")
    cached = lock.read_text(encoding="utf-8").split() if lock.exists() else []
    if len(cached) == 2 and cached[0] == installed:
        return cached[1]
    from mlflow.store.db.utils import _get_latest_schema_revision

    revision = _get_latest_schema_revision()
    lock.write_text(f"{installed} {revision}\n", encoding="utf-8")  # under the lock: one writer
    return revision


def _build(path: Path, migrate: bool) -> None:
    """A complete store at `path`: a new one, or the old one migrated, made in a copy first."""
    import sqlalchemy
    from mlflow.store.db.utils import _upgrade_db
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        if migrate:
            # sqlite's own copy: consistent even if another process writes meanwhile.
            with closing(sqlite3.connect(path)) as source, closing(sqlite3.connect(tmp)) as copy:
                source.backup(copy)
            engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
            _upgrade_db(engine)
            engine.dispose()
        # Creates the tables (or checks the migrated ones) and the default experiment.
        store = SqlAlchemyStore(f"sqlite:///{tmp}", (path.parent / ARTIFACTS_DIR).as_uri())
        store.engine.dispose()
        os.replace(tmp, path)
    except Exception as error:
        what = "migrate" if migrate else "create"
        reason = " ".join(str(error).split())[:300]
        raise StoreError(f"MLflow store {path}: could not {what} it: {reason}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _damaged(path: Path, why: str) -> StoreError:
    return StoreError(
        f"MLflow store {path} is damaged: {why}; move it aside (mv {path} {path}.broken) and run "
        "again to start a new store, or set MLFLOW_TRACKING_URI to another one"
    )
