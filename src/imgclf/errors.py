"""Errors a user can cause, and the one place that turns them into a line and an exit code."""

import os
import signal
import sys
from collections.abc import Callable


class ImgclfError(Exception):
    """A problem the user can fix (bad input, missing file); reported without a traceback."""

    exit_code = 1


class ConfigError(ImgclfError):
    """A bad key or value in the configuration; raised before any work is done."""

    exit_code = 2


def run_or_exit(main: Callable[[], object], teardown: bool = True) -> None:
    """Run a command's body; report an ImgclfError in one line and exit with its code.

    SIGTERM (`dvc queue kill`, a CI timeout) stops the body as Ctrl-C does, so that cleanup runs:
    temporary files go, and an MLflow run ends as KILLED instead of staying RUNNING.

    teardown=False: once the body has returned, exit at once, without the interpreter's teardown
    of every module (about 1.3 s once torch and Lightning are loaded). For the stage scripts, whose
    outputs are all written and closed by then.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except ImgclfError as error:
        print(f"imgclf: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("imgclf: interrupted", file=sys.stderr)
        sys.exit(130)
    if not teardown:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
