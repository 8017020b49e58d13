"""imgclf.supervisor on small stand-ins for a server, in seconds: a parent that lingers after its
listener is killed (as `mlflow server` does with its job runners), a stop asked of the supervisor,
a command's exit status. tests/e2e/test_make_servers.py runs the make targets themselves."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from imgclf.supervisor import POLL_S
from tests.conftest import REPO, tool_env

# A parent that starts a listener and a bystander, prints the listener's port, and lingers.
SERVER = """
import subprocess, sys, time
listener = subprocess.Popen([sys.executable, "-c", '''
import socket, time
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen()
print(sock.getsockname()[1], flush=True)
time.sleep(600)
'''])
bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
time.sleep(600)
"""
STOP_S = 10  # the supervisor's poll (1 s) and grace (5 s), with room for a busy machine


@contextlib.contextmanager
def supervised(*command: str) -> Iterator[tuple[subprocess.Popen, list[psutil.Process]]]:
    """`python -m imgclf.supervisor -- command` in a session of its own, and a list for the
    processes under it (`server_tree`); all of them are killed afterwards."""
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "imgclf.supervisor", "--", *command],
        cwd=REPO, env=tool_env(REPO), stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    seen: list[psutil.Process] = []
    try:
        yield supervisor, seen
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            seen += [psutil.Process(supervisor.pid), *psutil.Process(supervisor.pid).children(recursive=True)]
        for process in seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        supervisor.wait()
        supervisor.stdout.close()


def server_tree(supervisor: subprocess.Popen, seen: list[psutil.Process]) -> psutil.Process:
    """The listener, once it printed its port; every process under the supervisor goes into `seen`."""
    port = int(supervisor.stdout.readline())
    deadline = time.monotonic() + STOP_S
    while True:
        tree = psutil.Process(supervisor.pid).children(recursive=True)
        listeners = [p for p in tree if any(c.laddr.port == port for c in p.net_connections("tcp"))]
        if len(tree) == 3 and listeners:  # the parent, its listener and its bystander
            seen += tree
            return listeners[0]
        assert time.monotonic() < deadline, tree
        time.sleep(0.1)


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_killing_the_listener_stops_the_parent_that_lingers_and_its_other_children():
    with supervised(sys.executable, "-c", SERVER) as (supervisor, tree):
        listener = server_tree(supervisor, tree)
        time.sleep(2 * POLL_S)  # the supervisor has seen it listen (a user kills a server that answered)
        os.kill(listener.pid, signal.SIGTERM)
        assert supervisor.wait(timeout=STOP_S) == 128 + signal.SIGTERM  # the parent's end, by SIGTERM
        assert not [p for p in tree if running(p)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_asked_of_the_supervisor_stops_the_whole_tree(signum):
    with supervised(sys.executable, "-c", SERVER) as (supervisor, tree):
        server_tree(supervisor, tree)
        os.kill(supervisor.pid, signum)
        assert supervisor.wait(timeout=STOP_S) == 128 + signum
        assert not [p for p in tree if running(p)]


def test_the_exit_status_is_the_commands():
    with supervised("sh", "-c", "exit 3") as (supervisor, _):
        assert supervisor.wait(timeout=STOP_S) == 3
    with supervised("no-such-command-imgclf") as (supervisor, _):
        assert supervisor.wait(timeout=STOP_S) == 127
