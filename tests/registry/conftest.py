"""Two evaluated pipelines (the session's `evaluated_pipeline`, and the same data with a model
trained for 2 epochs), and a store per test: a fresh sqlite file, or the session's real
`mlflow server` (each test registers under a model name of its own there).

`imgclf(...)` runs the command line in this process, as `imgclf ...` in the repo's folder would
(the mlflow import is paid once, not per call); the tests of concurrency start real processes.
"""

import contextlib
import io
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import run


@pytest.fixture(scope="session")
def pipelines(evaluated_pipeline, tmp_path_factory) -> dict[str, Path]:
    """{"good": repo, "weak": repo}: each evaluated from committed code (the model is `clean`)."""
    good, _ = evaluated_pipeline
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
def sqlite_store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


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


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def imgclf(repo: Path, store: str, *args: str, check: bool = True, env: dict | None = None) -> Done:
    """`imgclf ARGS` in `repo` against `store`: the real command line, in this process."""
    import mlflow.tracking._tracking_service.utils as tracking_utils

    from imgclf import cli

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(repo)
        for key, value in {"MLFLOW_TRACKING_URI": store, **(env or {})}.items():
            patch.setenv(key, value)
        # `register` may point MLflow's fluent API at the store, for the whole process: undone here.
        patch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main(list(args))
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
    done = Done(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"imgclf {' '.join(args)} exited {code}\n{done.stdout}\n{done.stderr}")
    return done
