"""Two evaluated pipelines (a good model, then the same data with a model trained for 2 epochs),
made once per session by the real `dvc repro` in copies of this repo, and a store per test:
a fresh sqlite file, or the session's real `mlflow server` (each test its own model name there)."""

import shutil
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo, run


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    """{"good": repo, "weak": repo}: each evaluated, committed code (the model is `clean`)."""
    good = copy_repo(tmp_path_factory.mktemp("good") / "repo")
    run(["dvc", "repro"], good)
    weak = tmp_path_factory.mktemp("weak") / "repo"
    shutil.copytree(good, weak, symlinks=True)
    run(["imgclf", "params", "train.max_epochs=2"], weak)
    run(["dvc", "repro"], weak)
    return {"good": good, "weak": weak}


@pytest.fixture(params=["sqlite", "server"])
def store(request, tmp_path) -> str:
    """A tracking URI: a new sqlite store, or the session's mlflow server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    return request.getfixturevalue("mlflow_server")


@pytest.fixture
def repos(pipelines, tmp_path) -> dict[str, Path]:
    """This test's copies of both pipelines, registering under a model name of its own."""
    name = f"digits-{uuid.uuid4().hex[:8]}"
    copies = {}
    for kind, source in pipelines.items():
        copies[kind] = tmp_path / kind
        shutil.copytree(source, copies[kind], symlinks=True)
        set_param(copies[kind], "registry.model_name", name)
    return copies


def set_param(repo: Path, dotted: str, value) -> None:
    """Set one key of params.yaml, as an editor would (no stage reads registry.* or promote.*)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def imgclf(repo: Path, store: str, *args: str, check: bool = True, env: dict | None = None):
    """`imgclf ARGS` in `repo` against `store`, as a user runs it."""
    return run(["imgclf", *args], repo, check=check, extra_env={"MLFLOW_TRACKING_URI": store, **(env or {})})
