"""Data and models on a DVC S3 remote (`make remote`, `make push`, `make pull`), against moto's S3
server: a collaborator's clone pulls what another clone pushed and runs no stage again."""

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run
from tests.support.repo import copy_repo

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

URL = "s3://imgclf/imgclf"
STAGES = ("normalize", "train", "export", "evaluate")
NOTHING_TO_DO = {"download": ["always changed"]}  # download runs on every repro, by design


def make(target: str, cwd: Path, env: dict | None = None, **kwargs):
    """A Makefile target as a user runs it, with the venv taken as installed."""
    return run(["make", "--no-print-directory", "-o", "install", target], cwd, extra_env=env, **kwargs)


def test_a_clone_pulls_the_pushed_outputs_and_runs_no_stage(evaluated_pipeline, s3, tmp_path):
    source, _ = evaluated_pipeline
    pusher, puller = tmp_path / "pusher", tmp_path / "puller"
    shutil.copytree(source, pusher, symlinks=True)
    run(["git", "add", "--all"], pusher)
    run(["git", "commit", "--quiet", "-m", "pipeline ran"], pusher)  # dvc.lock and metrics

    make("remote", pusher, s3 | {"URL": URL})
    changed = run(["git", "status", "--porcelain"], pusher).stdout.splitlines()
    assert changed == [" M .dvc/config"]  # config.local, had it been written, is ignored
    diff = run(["git", "diff"], pusher).stdout
    assert f"url = {URL}" in diff
    assert s3["AWS_ENDPOINT_URL_S3"] not in diff and "testing" not in diff  # endpoint, credentials
    run(["git", "commit", "--quiet", "--all", "-m", "remote"], pusher)

    run(["git", "clone", "--quiet", str(pusher), str(puller)], tmp_path)
    assert not (puller / "models").exists() and not (puller / ".dvc" / "cache").exists()
    early = make("pull", puller, s3)  # nothing pushed yet: DVC warns, `dvc repro` would make them
    assert "Missing cache files" in early.stderr and not (puller / "models/model.onnx").exists()
    make("push", pusher, s3)
    make("pull", puller, s3)
    assert (puller / "models/model.onnx").read_bytes() == (pusher / "models/model.onnx").read_bytes()
    assert json.loads(run(["dvc", "status", "--json"], puller).stdout) == NOTHING_TO_DO

    repro = run(["dvc", "repro"], puller).stdout
    assert [line for line in repro.splitlines() if line.startswith("Running stage")] == [
        "Running stage 'download':"
    ]
    assert "download: data/raw/digits is up to date" in repro  # dvc.lock vouches for the pulled data
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in repro

    # The lock vouches only for the code it names: edited download code downloads again.
    (puller / "data/raw/.digits.source").unlink()  # as right after the pull
    fetch = puller / "src/imgclf/data/fetch.py"
    fetch.write_text(fetch.read_text(encoding="utf-8") + "\n# an edit\n", encoding="utf-8")
    download = ["python", "pipelines/download.py", "--params", "params.yaml", "--raw", "data/raw/digits"]
    assert "download: digits -> data/raw/digits" in run(download, puller).stdout


def test_bytecode_that_python_writes_changes_no_stage(evaluated_pipeline, tmp_path):
    source, _ = evaluated_pipeline
    clone = tmp_path / "clone"
    shutil.copytree(source, clone, symlinks=True)
    run(["python", "-m", "compileall", "-q", "src"], clone)  # what importing the code leaves
    assert json.loads(run(["dvc", "status", "--json"], clone).stdout) == NOTHING_TO_DO


def test_pull_without_a_remote_says_so_and_succeeds(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    done = make("pull", repo)
    assert done.stdout.splitlines() == [
        "make pull: no DVC remote configured (make remote URL=s3://...), nothing to pull"
    ]
    assert not (repo / "models").exists()
