"""Run a server so that stopping it leaves no process behind: `python -m imgclf.supervisor -- COMMAND...`.

`make ui`, `make server`, `make serve` and `make team-server` start their server through it. A
server is often a tree: `mlflow server` starts uvicorn, which listens, and job runners beside it;
when the listener alone is killed by its PID, its parent and the job runners live on. So COMMAND
runs in a session (and process group) of its own; SIGINT, SIGTERM and SIGHUP are passed on to that
whole group; and the group is stopped (SIGTERM, then SIGKILL after GRACE_S) as soon as COMMAND's
process exits, or nothing in its tree listens any more after something did, or GRACE_S after a
signal asked it to stop. The exit status is COMMAND's (128 + N when signal N ended it, as a shell
reports it).

psutil starts and waits for the process and finds its children and their listening sockets. Like
the inference path, this imports no torch, lightning or mlflow: it adds no start-up time.
"""

import argparse
import os
import signal
import sys
import time

import psutil

GRACE_S = 5.0  # from a stop to SIGKILL: uvicorn's graceful shutdown takes well under a second
# How often the tree's listening sockets are looked for. A listener killed before the first look
# after it began to listen goes unnoticed: the group is then stopped when the command's process exits.
POLL_S = 1.0
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Supervisor:
    """COMMAND in a process group of its own, which `watch` stops as a whole before it returns."""

    def __init__(self, command: list[str], grace_s: float = GRACE_S, poll_s: float = POLL_S):
        self.command = command
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.server: psutil.Popen | None = None
        self.early: list[int] = []  # signals that came before the server existed
        self.stop_asked_at: float | None = None

    def start(self) -> None:
        """Start COMMAND; OSError when it cannot be (not found, not executable)."""
        for signum in FORWARDED:
            signal.signal(signum, self.forward)
        self.server = psutil.Popen(self.command, start_new_session=True)
        for signum in self.early:
            self.forward(signum, None)

    def watch(self) -> int:
        """Wait while COMMAND serves, then stop its whole group; COMMAND's exit status."""
        try:
            self.wait_while_serving()
        finally:
            stop_group(self.server.pid, self.grace_s)
        returncode = self.server.wait()
        return 128 - returncode if returncode < 0 else returncode

    def forward(self, signum: int, _frame) -> None:
        if self.server is None:
            self.early.append(signum)
            return
        if self.stop_asked_at is None:
            self.stop_asked_at = time.monotonic()
        signal_group(self.server.pid, signum)

    def wait_while_serving(self) -> None:
        """Return once the server's process exited, once nothing in its tree listens any more
        after something did (the listener was killed, a parent lingers), or GRACE_S after a stop
        was asked for and not done."""
        listened = False
        while True:
            try:
                self.server.wait(timeout=self.poll_s)
                return
            except psutil.TimeoutExpired:
                pass
            if self.stop_asked_at is not None and time.monotonic() - self.stop_asked_at > self.grace_s:
                return
            listening = listens(self.server)
            if listened and not listening:
                return
            listened = listened or listening


def listens(root: psutil.Process) -> bool:
    """Whether `root` or a process under it has a listening TCP socket."""
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for process in tree:
        try:
            if any(c.status == psutil.CONN_LISTEN for c in process.net_connections(kind="tcp")):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return False


def stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM to every process of group `pgid`, then SIGKILL to those still running after grace_s."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if not signal_group(pgid, signum):
            return
        deadline = time.monotonic() + grace_s
        while group_running(pgid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        else:
            return


def group_running(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs.

    A zombie does not: it has ended and waits for its parent to read its status. psutil.wait_procs
    would wait for it, and an orphan's zombie waits forever where PID 1 reaps nothing (some
    containers), so the group is looked for here instead.
    """
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except ProcessLookupError:
            continue
    return False


def signal_group(pgid: int, signum: int) -> bool:
    """Send `signum` to group `pgid`; False when the group has no process left."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imgclf.supervisor",
        description="Run a server; stopping it (Ctrl-C, or a kill of its listener) stops all its processes.",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the server's command, after --")
    command = parser.parse_args(argv).command
    command = command[1:] if command[:1] == ["--"] else command
    if not command:
        parser.error("no command: python -m imgclf.supervisor -- COMMAND [ARG...]")
    supervisor = Supervisor(command)
    try:
        supervisor.start()
    except OSError as error:
        print(f"imgclf.supervisor: cannot run {command[0]}: {error.strerror}", file=sys.stderr)
        return 127
    return supervisor.watch()


if __name__ == "__main__":
    sys.exit(main())
