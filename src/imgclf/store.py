"""Where the MLflow store is: one rule for the pipeline (imgclf.tracking) and for serving.

Plain Python, without the config schema or mlflow, so that `imgclf predict` and `imgclf serve`
can use it and still start fast.
"""

import os
from pathlib import Path

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
