"""Ctrl-C and SIGTERM during a sweep: a flag the worker checks, passed on to the running experiment."""

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress


class Stop:
    """Ctrl-C (SIGINT) or SIGTERM during a sweep: the running experiment gets SIGINT, as Ctrl-C
    in its own terminal would (a second signal: SIGKILL); its trial is told FAIL; no trial starts
    after it. A flag, not an exception: nothing is cut short inside a database call."""

    def __init__(self) -> None:
        self.signals = 0
        self.process: subprocess.Popen | None = None

    @property
    def requested(self) -> bool:
        return self.signals > 0

    def __call__(self, signum, frame) -> None:
        self.signals += 1
        self.pass_on()

    def pass_on(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGINT if self.signals == 1 else signal.SIGKILL)

    @contextmanager
    def watching(self, process: subprocess.Popen) -> Iterator[None]:
        self.process = process
        if self.requested:  # the signal came while the trial was being set up
            self.pass_on()
        try:
            yield
        finally:
            self.process = None


@contextmanager
def stop_on_signals() -> Iterator[Stop]:
    stop = Stop()
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
