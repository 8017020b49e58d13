"""The stages' MLflow writes and plots, made by a side process while the stage works.

Importing MLflow's client takes 1.5-2 s here, as long as a whole digits fit, and every stage that
tracks paid it before doing anything. A stage now starts a `Tracker` first: its side process
imports mlflow (and matplotlib, for the PNGs it draws) on another core while the stage imports
torch and computes, then makes the stage's calls in the order they were sent. The stage never
imports mlflow; it waits only for an answer it needs (the run id) and, at the end, for the side
process to finish, so a stage still fails, with the store's one-line error, if tracking failed.
The store is any MLflow store: the repo's sqlite file, a server, PostgreSQL.

The side process follows one run: the one `open_run`, `adopt_run` or `use_run` named. If the
stage dies without closing it (SIGKILL, out of memory), it ends that run as FAILED. Ctrl-C and
SIGTERM reach the stage, which ends the run as KILLED; the side process ignores them and exits
when the stage closes its pipe.

Protocol: one JSON object per line. The stage sends {"verb", "args", "reply"}; the side process
answers a call that asks for a reply with {"result"}, and its first failure with
{"error", "exit_code"}, after which it skips every call but `finish`.
"""

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from imgclf.config.pipeline import PipelineConfig
from imgclf.errors import ImgclfError
from imgclf.tracking import client as tracking

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


class TrackingError(ImgclfError):
    """Tracking failed in the side process (store unreachable, damaged, busy): its one line."""


def launched_as_rank_zero(environ: dict[str, str] = os.environ) -> bool:
    """False when a launcher (Lightning's DDP, torchrun, another node, SLURM) says this process is
    not global rank 0, which tracks nothing: the train stage then starts no side process early."""
    return all(environ.get(name, "0") == "0" for name in RANK_VARIABLES)


class Reply:
    """The answer to one call, read when it is needed."""

    def __init__(self, tracker: "Tracker", index: int):
        self.tracker, self.index = tracker, index

    def result(self) -> Any:
        return self.tracker._wait_for(self.index)


class Tracker:
    """The stage's side of the side process: calls are sent at once and made in order there."""

    def __init__(self, config: PipelineConfig, start: bool = True, plots: bool = False, model: bool = False):
        """`start`: start the side process now (else at the first call). `plots` (the stage will
        draw) and `model` (it will log an ONNX model): the side process prepares for it early."""
        self.config, self.plots, self.model = config, plots, model
        self.process: subprocess.Popen | None = None
        self.sent = 0
        self.replies: dict[int, Any] = {}
        self.buffer = b""
        self.error: TrackingError | None = None
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

    # -- calls --------------------------------------------------------------------------------

    def open_run(self, data_dir: Path, raw_dir: Path, report: Path) -> Reply:
        """A new pipeline run (lineage tags, config as params, data set and report); its id."""
        return self._call("open_run", str(data_dir), str(raw_dir), str(report), reply=True)

    def adopt_run(self, run_id: str | None, data_dir: Path, raw_dir: Path) -> Reply:
        """Continue run `run_id`, or a new run if the store lost it: {"run_id", "lineage"}."""
        return self._call("adopt_run", run_id, str(data_dir), str(raw_dir), reply=True)

    def use_run(self, run_id: str) -> None:
        """Continue run `run_id`; if the store lost it, the calls that follow log nothing."""
        self._call("use_run", run_id)

    def log_metric_history(self, points: list[tuple[str, float, int]]) -> None:
        self._call("log_metric_history", [list(point) for point in points])

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self._call("log_metrics", metrics)

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        self._call("log_artifacts", [str(path) for path in paths], artifact_path)

    def log_onnx_model(self, onnx_path: Path, example: list, parity: dict, sidecar: Path) -> None:
        self._call("log_onnx_model", str(onnx_path), example, parity, str(sidecar))

    def draw_curves(self, rows: list[dict[str, float]], png: Path) -> None:
        self._call("draw_curves", rows, str(png))

    def draw_confusion(self, matrix: list[list[int]], classes: list[str], png: Path) -> None:
        self._call("draw_confusion", matrix, classes, str(png))

    def wait_idle(self) -> None:
        """Return when every call sent so far is made: the CPU is the stage's alone again."""
        self._call("ping", reply=True).result()

    @contextmanager
    def run_status(self) -> Iterator[None]:
        """End the run as KILLED (Ctrl-C, SIGTERM) or FAILED if the block raises, else FINISHED."""
        try:
            yield
        except BaseException as error:
            if self.error is None:
                status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
                self._call("finish", status)
            raise
        self._call("finish", "FINISHED")

    def discard(self) -> None:
        """This process tracks nothing (a DDP rank other than 0): stop the side process unused."""
        self.discarded = True
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def close(self) -> None:
        """Wait until every call is made; TrackingError if one failed."""
        if self.process is None:
            return
        process, self.process = self.process, None
        try:  # the last call; then end of input: the side process finishes its calls and exits
            self._send({"verb": "close", "args": []}, process)
            process.stdin.close()
        except TrackingError:
            pass
        code = process.wait()
        self._read_messages(process, block=False, until_eof=True)
        if self.error:
            raise self.error
        if code:
            raise TrackingError(f"the tracking process exited with code {code}")

    # -- plumbing -------------------------------------------------------------------------------

    def _start(self) -> None:
        # The side process runs this very checkout's code, whatever the environment's install says.
        source = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imgclf.tracking.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path},
        )
        # As it was given (unset keys left out), so that validation there sees what it saw here.
        raw = self.config.model_dump(mode="json", exclude_unset=True)
        self._send({"verb": "configure", "args": [raw, self.plots, self.model], "reply": False})

    def _call(self, verb: str, *args: Any, reply: bool = False) -> Reply | None:
        if self.discarded:
            raise RuntimeError(f"tracking call {verb!r} after discard()")
        if self.process is None:
            self._start()
        self._read_messages(self.process, block=False)
        if self.error:
            raise self.error
        self.sent += 1
        self._send({"verb": verb, "args": list(args), "reply": reply, "index": self.sent})
        return Reply(self, self.sent) if reply else None

    def _send(self, message: dict, process: subprocess.Popen | None = None) -> None:
        process = process or self.process
        try:
            process.stdin.write(json.dumps(message).encode() + b"\n")
            process.stdin.flush()
        except BrokenPipeError:
            self._read_messages(process, block=False, until_eof=True)
            raise self.error or TrackingError("the tracking process stopped unexpectedly") from None

    def _wait_for(self, index: int) -> Any:
        while index not in self.replies:
            if self.error:
                raise self.error
            if self.process is None:
                raise TrackingError("the tracking process is closed")
            if not self._read_messages(self.process, block=True):
                raise self.error or TrackingError("the tracking process stopped unexpectedly")
        return self.replies.pop(index)

    def _read_messages(self, process: subprocess.Popen, block: bool, until_eof: bool = False) -> bool:
        """Take the messages that have arrived (with `block`, wait for one); False at end of file."""
        fd = process.stdout.fileno()
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                message = json.loads(line)
                if "error" in message:
                    self.error = self.error or TrackingError(message["error"])
                    self.error.exit_code = message.get("exit_code", 1)
                else:
                    self.replies[message["index"]] = message["result"]
                if block:
                    return True
            if not (block or until_eof) and not select.select([fd], [], [], 0)[0]:
                return True
            data = os.read(fd, 65536)
            if not data:
                return False
            self.buffer += data


# -- the side process --------------------------------------------------------------------------


class SideProcess:
    """Makes the calls for one stage, in order, against the run it follows."""

    def __init__(self, answers):
        self.answers = answers
        self.config: PipelineConfig | None = None
        self.run_id: str | None = None
        self.finished = True
        self.failed = False
        self.closed = False

    def configure(self, raw: dict, plots: bool, model: bool) -> None:
        from imgclf.config.pipeline import validate_pipeline

        self.config = validate_pipeline(raw)
        # Ahead of the first call that needs them, while the stage is still busy: the store (a
        # sqlite file is checked against MLflow's schema) and the plotting library. Only a store
        # that is there: a stage that stops before its first call (a wrong DDP launch) creates none.
        uri = tracking.tracking_uri(self.config)
        if uri.startswith(("http://", "https://")) or Path(uri.removeprefix("sqlite:///")).is_file():
            tracking.client(self.config)
        if plots:
            from imgclf.tracking.plots import pyplot

            pyplot()
        if model:
            tracking.prepare_model_logging()

    def open_run(self, data_dir: str, raw_dir: str, report: str) -> str:
        tags = tracking.lineage(self.config, Path(data_dir), Path(raw_dir))
        self._follow(tracking.start_run(self.config, tags))
        tracking.log_dataset(self.config, self.run_id, tags, Path(report))
        tracking.log_data_report(self.config, self.run_id, Path(report))
        return self.run_id

    def adopt_run(self, run_id: str | None, data_dir: str, raw_dir: str) -> dict:
        tags = tracking.lineage(self.config, Path(data_dir), Path(raw_dir))
        if run_id and tracking.existing_run(self.config, run_id):
            self._follow(run_id)
        else:  # the store lost the train stage's run (outputs restored by DVC): a fresh one
            self._follow(tracking.start_run(self.config, tags))
        return {"run_id": self.run_id, "lineage": tags}

    def use_run(self, run_id: str) -> None:
        existing = tracking.existing_run(self.config, run_id)
        self.run_id, self.finished = existing, existing is None

    def log_metric_history(self, points: list[list]) -> None:
        if self.run_id:
            tracking.log_metric_history(self.config, self.run_id, [tuple(point) for point in points])

    def log_metrics(self, metrics: dict[str, float]) -> None:
        if self.run_id:
            tracking.log_metrics(self.config, self.run_id, metrics)

    def log_artifacts(self, paths: list[str], artifact_path: str | None) -> None:
        if self.run_id:
            tracking.log_artifacts(self.config, self.run_id, [Path(p) for p in paths], artifact_path)

    def log_onnx_model(self, onnx_path: str, example: list, parity: dict, sidecar: str) -> None:
        if self.run_id:
            tracking.log_onnx_model(self.config, self.run_id, Path(onnx_path), example, parity, Path(sidecar))

    def draw_curves(self, rows: list[dict[str, float]], png: str) -> None:
        from imgclf.tracking.plots import draw_curves

        draw_curves(rows, Path(png))

    def draw_confusion(self, matrix: list[list[int]], classes: list[str], png: str) -> None:
        from imgclf.tracking.plots import draw_confusion

        draw_confusion(matrix, classes, Path(png))

    def ping(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    def finish(self, status: str) -> None:
        if self.run_id and not self.finished:
            tracking.client(self.config).set_terminated(self.run_id, status)
        self.finished = True

    def _follow(self, run_id: str) -> None:
        self.run_id, self.finished = run_id, False

    def handle(self, message: dict) -> None:
        verb = message["verb"]
        if self.failed and verb not in ("finish", "close"):
            return
        try:
            result = getattr(self, verb)(*message["args"])
        except ImgclfError as error:
            self._fail(str(error), error.exit_code)
            return
        except Exception as error:  # a store's own exception: its message is the useful part
            import traceback

            traceback.print_exc(file=sys.stderr)
            reason = " ".join(str(error).split())[:300]
            self._fail(f"MLflow tracking failed ({verb}): {type(error).__name__}: {reason}", 1)
            return
        if message.get("reply"):
            self.answers({"index": message["index"], "result": result})

    def _fail(self, line: str, exit_code: int) -> None:
        self.failed = True
        self.answers({"error": line, "exit_code": exit_code})


def serve() -> None:
    """The side process: read calls from stdin until it closes."""
    # Ctrl-C and SIGTERM are the stage's to handle; this process ends when the stage closes stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Answers get a private copy of stdout; anything a library prints goes to stderr instead.
    answers_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)

    def answer(message: dict) -> None:
        answers_out.write(json.dumps(message).encode() + b"\n")

    side = SideProcess(answer)
    # Now, while the stage starts up: mlflow's client, which the stage's first call needs.
    import mlflow.tracking  # noqa: F401

    for line in sys.stdin.buffer:
        side.handle(json.loads(line))
    if not side.closed:  # the stage died without closing: its run did not finish
        side.finish("FAILED")
    # Every write is committed by now. Skipping the interpreter's teardown of mlflow, sqlalchemy and
    # matplotlib saves about 1 s that the stage would spend waiting for this process to exit.
    sys.stderr.flush()
    os._exit(1 if side.failed else 0)


if __name__ == "__main__":
    serve()
