"""The stages' MLflow writes and plots, made by a worker process while the stage works.

Importing MLflow's client takes 1.5-2 s here, as long as a whole digits fit, and every stage that
tracks paid it before doing anything. A stage now starts a `Tracker` first: a process pool of one
worker, which imports mlflow (and matplotlib, for the PNGs it draws) on another core while the
stage imports torch and computes, then makes the stage's calls in the order they were submitted.
Each call is a function of imgclf.tracking.client or imgclf.tracking.plots, written once there;
the stage never imports mlflow. It waits only for an answer it needs (a run id, as a future) and,
at the end, for every call to be made, so a stage still fails, with the store's one-line error
(TrackingError), if tracking failed. After its first failure the worker makes no call but the
one that ends the run. The store is any MLflow store: the repo's sqlite file, a server, PostgreSQL.

The worker follows one run: the one its last `follow` call named. `run_status` ends it as KILLED
on Ctrl-C or SIGTERM, which reach the stage (the worker ignores them), FAILED if the stage's block
raises, FINISHED otherwise. If the stage dies without ending it (SIGKILL, out of memory), a thread
in the worker sees its parent go, ends the run as FAILED and stops the worker.
"""

import atexit
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from imgclf.config.pipeline import PipelineConfig, flatten
from imgclf.errors import ImgclfError
from imgclf.tracking import client as tracking

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


class TrackingError(ImgclfError):
    """Tracking failed in the worker (store unreachable, damaged, busy): its one line."""

    def __init__(self, line: str, exit_code: int = 1):
        super().__init__(line)
        self.exit_code = exit_code  # an attribute, not an argument: it survives the trip back


def launched_as_rank_zero(environ: dict[str, str] = os.environ) -> bool:
    """False when a launcher (Lightning's DDP, torchrun, another node, SLURM) says this process is
    not global rank 0, which tracks nothing: the train stage then starts no worker early."""
    return all(environ.get(name, "0") == "0" for name in RANK_VARIABLES)


class Tracker:
    """The stage's side of the worker: each call is submitted at once and made in order there.

    The worker is spawned: it imports the stage's script again, so a script that starts a Tracker
    keeps its work under `if __name__ == "__main__":` (as pipelines/*.py do)."""

    def __init__(
        self,
        config: PipelineConfig,
        params: dict | None = None,
        start: bool = True,
        plots: bool = False,
        model: bool = False,
    ):
        """`params`: what a new run logs as its params, flattened: the raw params.yaml (its promote
        and sweep sections too, which no stage reads); default, the config. `start`: start the
        worker now (else at the first call). `plots` (the stage will draw) and `model` (it will log
        an ONNX model): the worker prepares for them early."""
        self.config, self.plots, self.model = config, plots, model
        self.params = flatten(config if params is None else params)
        self.pool: ProcessPoolExecutor | None = None
        self.futures: list[Future] = []
        self.discarded = False
        if start:
            self._start()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            self.close()
            return
        with suppress(ImgclfError):  # the block's own error is the one to report
            self.close()

    def submit(self, function: Callable, *args: Any) -> Future:
        """`function(*args)` in the worker (a plot)."""
        return self._submit(_call, function, *args)

    def follow(self, function: Callable, *args: Any) -> Future:
        """`function(config, *args)` in the worker, which answers the run that `log` calls go to
        from then on: its id, None (no run: they log nothing) or a dict with it as "run_id"."""
        return self._submit(_follow, function, *args)

    def log(self, function: Callable, *args: Any) -> Future:
        """`function(config, run_id, *args)` in the worker, for the followed run; without one, nothing."""
        return self._submit(_log, function, *args)

    @contextmanager
    def run_status(self) -> Iterator[None]:
        """End the run as KILLED (Ctrl-C, SIGTERM) or FAILED if the block raises, else FINISHED
        (FAILED too if a call failed: `close` then raises its error)."""
        try:
            yield
        except BaseException as error:
            with suppress(ImgclfError):  # the block's own error is the one to report
                self._submit(
                    _end_run, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED", check=False
                )
            raise
        self._submit(_end_run, "FINISHED", check=False)

    def wait(self) -> None:
        """Return when every call submitted so far is made (the CPU is the stage's alone again);
        TrackingError if one failed."""
        wait(self.futures)
        self._check()

    def discard(self) -> None:
        """This process tracks nothing (a DDP rank other than 0): let the worker go unused."""
        self.discarded = True
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def close(self) -> None:
        """Wait until every call is made and the worker has stopped; TrackingError if a call failed."""
        if self.pool is None:
            return
        try:
            self.wait()
        finally:
            pool, self.pool = self.pool, None
            pool.shutdown()

    def _start(self) -> None:
        self.pool = ProcessPoolExecutor(
            max_workers=1,
            # A fresh interpreter (no copy of a stage that has imported torch, or holds threads); it
            # gets the stage's sys.path, so it runs this very checkout's code.
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(self.config,),
        )
        self._submit(_prepare, self.plots, self.model)

    def _submit(self, function: Callable, *args: Any, check: bool = True) -> Future:
        if self.discarded:
            raise RuntimeError("a tracking call after discard()")
        if self.pool is None:
            self._start()
        if check:
            self._check()
        try:
            future = self.pool.submit(function, *args)
        except BrokenProcessPool:
            raise TrackingError("the tracking process stopped unexpectedly") from None
        self.futures.append(future)
        return future

    def _check(self) -> None:
        """Raise the error of the first call that failed, if one has; forget the calls made."""
        while self.futures and self.futures[0].done():
            error = self.futures[0].exception()
            if isinstance(error, BrokenProcessPool):
                raise TrackingError("the tracking process stopped unexpectedly") from error
            if error is not None:
                raise error
            self.futures.pop(0)


# -- in the worker -------------------------------------------------------------------------------


class Worker:
    """Makes the calls for one stage, in order, against the run it follows."""

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.run_id: str | None = None
        self.ended = True
        self.failure: TrackingError | None = None
        self.lock = threading.RLock()  # a call, or the end of the run when the stage has died

    def make(self, function: Callable, *args: Any) -> Any:
        """`function(*args)`; its failure, or an earlier one, as TrackingError."""
        with self.lock:
            if self.failure:
                raise self.failure
            try:
                return function(*args)
            except ImgclfError as error:
                self.failure = TrackingError(str(error), error.exit_code)
                raise self.failure from error
            except Exception as error:  # a store's own exception: its message is the useful part
                traceback.print_exc(file=sys.stderr)
                reason = " ".join(str(error).split())[:300]
                name = getattr(function, "__name__", "call")
                self.failure = TrackingError(
                    f"MLflow tracking failed ({name}): {type(error).__name__}: {reason}"
                )
                raise self.failure from error

    def end_run(self, status: str) -> None:
        with self.lock:
            if self.run_id is None or self.ended:
                return
            self.ended = True
            if self.failure is None:
                self.make(tracking.end_run, self.config, self.run_id, status)
            else:  # its error is reported already; the run did not go as planned
                with suppress(Exception):
                    tracking.end_run(self.config, self.run_id, "FAILED")

    def end_run_when_parent_dies(self) -> None:
        multiprocessing.parent_process().join()  # returns when the stage has exited or died
        with suppress(Exception):
            self.end_run("FAILED")
        sys.stderr.flush()
        os._exit(1)  # the pool's own loop, waiting for a call, would never return


_worker: Worker | None = None


def _start_worker(config: PipelineConfig) -> None:
    global _worker
    # Ctrl-C and SIGTERM are the stage's to handle (it ends the run as KILLED, then stops this worker).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what a library prints is no stage output
    # Every call is made, and every write committed, once the pool lets the worker go: skipping the
    # interpreter's teardown of mlflow, sqlalchemy and matplotlib saves the 1 s that `close` waits.
    atexit.register(_exit_at_once)
    _worker = Worker(config)
    threading.Thread(target=_worker.end_run_when_parent_dies, daemon=True).start()


def _exit_at_once() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _prepare(plots: bool, model: bool) -> None:
    """Ahead of the first call that needs them, while the stage is still busy: mlflow's client,
    the store (a sqlite file is checked against MLflow's schema) and the plotting library. Only a
    store that is there: a stage that stops before its first call (a wrong DDP launch) creates none."""
    import mlflow.tracking  # noqa: F401

    uri = tracking.tracking_uri(_worker.config)
    if uri.startswith(("http://", "https://")) or Path(uri.removeprefix("sqlite:///")).is_file():
        _worker.make(tracking.client, _worker.config)
    if plots:
        from imgclf.tracking.plots import pyplot

        _worker.make(pyplot)
    if model:
        _worker.make(tracking.prepare_model_logging)


def _call(function: Callable, *args: Any) -> Any:
    return _worker.make(function, *args)


def _follow(function: Callable, *args: Any) -> Any:
    answer = _worker.make(function, _worker.config, *args)
    with _worker.lock:
        _worker.run_id = answer["run_id"] if isinstance(answer, dict) else answer
        _worker.ended = _worker.run_id is None
    return answer


def _log(function: Callable, *args: Any) -> Any:
    if _worker.failure:
        raise _worker.failure
    if _worker.run_id is None:
        return None
    return _worker.make(function, _worker.config, _worker.run_id, *args)


def _end_run(status: str) -> None:
    _worker.end_run(status)
