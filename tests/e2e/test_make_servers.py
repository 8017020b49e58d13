"""Stopping a server that make started leaves no process behind (`make ui`, `make server`,
`make serve`, `make team-server`), stopped as a user stops one: Ctrl-C in its terminal (SIGINT to
make's process group), or `kill PID` of the process that listens on its port (the PID that
`ss -ltnp` shows).

Each target runs for real in a copy of this repo on a free 127.0.0.1 port. Once it answers, every
process under make is collected; none may still run a few seconds after the stop.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import copy_repo, tool_env
from tests.scale.conftest import create_database
from tests.support.servers import SERVER_START_S, free_port

pytestmark = pytest.mark.e2e

STOP_S = 20  # the supervisor's grace (5 s) and poll (1 s), with room for a busy machine
PORT = {"ui": "UI_PORT", "server": "SERVER_PORT", "serve": "SERVE_PORT", "team-server": "SERVER_PORT"}
BUCKET = "imgclf"  # the bucket of the `s3` fixture


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("make-servers") / "repo")


@pytest.fixture
def stores(request, target: str, repo: Path) -> dict[str, str]:
    """What `target` needs beyond the port: a models/model.onnx for serve; for team-server, a
    database of its own in the session's PostgreSQL cluster and a moto S3 bucket."""
    if target == "serve":
        model = request.getfixturevalue("model_path")
        (repo / "models").mkdir(exist_ok=True)
        for name in ("model.onnx", "model.json"):
            shutil.copy2(model.with_name(name), repo / "models" / name)
    if target == "team-server":
        cluster, s3 = request.getfixturevalue("postgres_url"), request.getfixturevalue("s3")
        database = create_database(cluster, f"mlflow_{uuid.uuid4().hex[:8]}")
        return s3 | {"BACKEND_URI": database, "ARTIFACTS_URI": f"s3://{BUCKET}/mlartifacts"}
    return {}


TEAM_SERVER = pytest.param("team-server", marks=pytest.mark.slow)  # a PostgreSQL cluster and S3


@pytest.mark.parametrize("target", ["ui", "server", "serve", TEAM_SERVER])
def test_killing_the_listener_stops_every_process(target, repo, stores, tmp_path):
    log = tmp_path / "make.log"
    with make_server(target, repo, stores, log) as (port, tree):
        listener = listener_on(port)
        assert listener in tree  # the listener is one of make's processes, not a stray one
        os.kill(listener.pid, signal.SIGTERM)
        assert_none_running(tree, log)


@pytest.mark.parametrize("target", ["ui", "server", "serve", TEAM_SERVER])
def test_ctrl_c_stops_every_process(target, repo, stores, tmp_path):
    log = tmp_path / "make.log"
    with make_server(target, repo, stores, log) as (_, tree):
        make = tree[0]
        os.killpg(make.pid, signal.SIGINT)  # what a terminal does: the foreground group, make's
        assert_none_running(tree, log)


@contextlib.contextmanager
def make_server(
    target: str, root: Path, extra_env: dict[str, str], log: Path
) -> Iterator[tuple[int, list[psutil.Process]]]:
    """`make target` on a free port, in a session of its own; once it answers: the port and every
    process under make, make first. All of them are killed afterwards, by process group."""
    port = free_port()
    env = tool_env(root) | extra_env | {PORT[target]: str(port)}
    with log.open("wb") as out:
        make = subprocess.Popen(
            ["make", "--no-print-directory", "-o", "install", target],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    tree = [psutil.Process(make.pid)]
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not answers(f"http://127.0.0.1:{port}/health"):
            assert make.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        tree += tree[0].children(recursive=True)
        yield port, tree
    finally:
        kill_all(tree + descendants(tree[0]))
        make.wait()


def listener_on(port: int) -> psutil.Process:
    """The process listening on `port`; of processes that share its socket (uvicorn's workers),
    the one that opened it: their parent. (psutil.net_connections names one holder per socket.)"""
    holders = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            sockets = process.net_connections(kind="tcp")
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in sockets):
                holders.append(process)
    pids = {process.pid for process in holders}
    (listener,) = [process for process in holders if process.ppid() not in pids]
    return listener


def assert_none_running(processes: list[psutil.Process], log: Path) -> None:
    deadline = time.monotonic() + STOP_S
    while (left := [p for p in processes if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    described = "\n".join(describe(p) for p in left)
    assert not left, f"{len(left)} running {STOP_S} s after the stop:\n{described}\n{log.read_text()[-2000:]}"


def describe(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.NoSuchProcess):
        return f"  {process.pid} {' '.join(process.cmdline())[:150]}"
    return f"  {process.pid} (ended)"


def running(process: psutil.Process) -> bool:
    """Alive and not a zombie (an ended process whose status nobody read yet)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_all(processes: list[psutil.Process]) -> None:
    """SIGKILL to the process group of each of `processes` still running (never the tests' own)."""
    groups = set()
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            if running(process):
                groups.add(os.getpgid(process.pid))
    for group in groups - {os.getpgrp()}:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False
