"""One trial's experiment: `dvc exp run --temp` as a child process, its epochs followed as they come.

The train stage appends each finished epoch to the JSON-lines file named by $IMGCLF_EPOCH_LOG
(imgclf.stages.training.callbacks), which the runner sets for the experiment; the runner hands
each epoch to the caller, and stops the experiment when the caller says so. The stage's printed
lines are for people and go, with the rest of the output, into the trial's log.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.errors import ImgclfError
from imgclf.sweep.signals import Stop

LOG_DIR = Path(".dvc", "tmp", "sweep")  # one log per trial; DVC's .dvc/.gitignore covers tmp/
# Spelled as in imgclf.stages.training.callbacks.EPOCH_LOG_ENV, which this package may not import;
# tests/code/test_training.py checks the two agree. Not a DVC output and not in the stage's cmd:
# those would re-run every user's training; DVC passes the environment through `dvc exp run`.
EPOCH_LOG_ENV = "IMGCLF_EPOCH_LOG"
POLL_S = 0.25  # how often the epoch file is read while the experiment runs
STOP_GRACE_S = 60  # after SIGINT, a stage ends its MLflow run and DVC removes its temporary copy

Epoch = dict[str, Any]  # one line of the epoch file: {"epoch": 1, "train_loss": ..., "val_loss": ...}


@dataclass(frozen=True)
class Outcome:
    state: str  # COMPLETE | PRUNED | FAIL, as told to the study
    value: float | None = None
    note: str = ""  # why it failed, where it was pruned, where it was pushed
    unpushed: bool = False  # complete, but `dvc exp push` failed


@dataclass(frozen=True)
class Experiment:
    """One trial's `dvc exp run --temp`: its name, its -S overrides, what it is scored on."""

    root: Path
    name: str
    overrides: list[str]  # the plan's, then the trial's
    metric: str  # a key of metrics/train.json

    @property
    def log(self) -> Path:
        return self.root / LOG_DIR / f"{self.name}.log"

    @property
    def epochs(self) -> Path:
        return self.root / LOG_DIR / f"{self.name}.epochs.jsonl"

    def command(self) -> list[str]:
        command = [dvc_executable(), "exp", "run", "--temp", "-n", self.name]
        for override in self.overrides:
            command += ["-S", override]
        return command


def run_experiment(experiment: Experiment, on_epoch: Callable[[Epoch], bool], stop: Stop) -> Outcome:
    """Run the experiment; PRUNED when `on_epoch` said stop, else the metric of its metrics/train.json."""
    root, name = experiment.root, experiment.name
    baseline = git(root, "rev-parse", "HEAD")
    code, pruned_at = run_watched(experiment, on_epoch, stop)
    if pruned_at is not None:
        return Outcome("PRUNED", note=f"at epoch {pruned_at}")
    ref = experiment_ref(root, name, baseline)
    if code or ref is None:
        why = "interrupted, the experiment stopped" if stop.requested else last_error(experiment.log)
        return Outcome("FAIL", note=f"{why} (log: {experiment.log.relative_to(root)})")
    metrics = json.loads(git(root, "show", f"{ref}:metrics/train.json") or "{}")
    value = metrics.get(experiment.metric)
    if not isinstance(value, int | float) or math.isnan(value):
        return Outcome("FAIL", note=f"metrics/train.json of {name} has {experiment.metric}={value!r}")
    return Outcome("COMPLETE", float(value))


def run_watched(
    experiment: Experiment, on_epoch: Callable[[Epoch], bool], stop: Stop
) -> tuple[int, int | None]:
    """Run the experiment in its own process group, its output into its log, each epoch to
    `on_epoch` as the train stage writes it. Its exit code, and the epoch it was stopped at when
    `on_epoch` said so (else None)."""
    experiment.log.parent.mkdir(parents=True, exist_ok=True)
    experiment.epochs.unlink(missing_ok=True)
    epochs = EpochFile(experiment.epochs)
    env = os.environ | {"PYTHONUNBUFFERED": "1", EPOCH_LOG_ENV: str(experiment.epochs)}
    with experiment.log.open("w", encoding="utf-8") as out:
        process = subprocess.Popen(
            experiment.command(),
            cwd=experiment.root,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches the sweep only: `Stop` passes it on
            env=env,
        )
        with stop.watching(process):
            while True:
                finished = process.poll() is not None  # then every epoch it wrote is in the file
                for epoch in epochs.read_new():
                    # An experiment that has finished is complete: it is reported, not pruned.
                    if not stop.requested and on_epoch(epoch) and not finished:
                        end_early(process)
                        return process.returncode, epoch["epoch"]
                if finished:
                    return process.returncode, None
                time.sleep(POLL_S)


class EpochFile:
    """The epochs appended to a JSON-lines file since the last read; a line still being written
    waits for the next read."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read_new(self) -> list[Epoch]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:  # training has not finished an epoch yet
            return []
        whole = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(whole)
        return [json.loads(line) for line in whole.splitlines() if line.strip()]


def end_early(process: subprocess.Popen) -> None:
    """SIGINT to the experiment's process group, as Ctrl-C would: the stage ends its MLflow run as
    KILLED and DVC removes its temporary copy. SIGKILL if that takes too long."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def last_error(log: Path) -> str:
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    errors = [line for line in lines if line.startswith(("ERROR", "imgclf: error"))]
    return (errors or lines or ["no output"])[-1][:300]


# --- git and DVC in the worker's clone ---------------------------------------------------------


def dvc_executable() -> str:
    beside = Path(sys.executable).parent / "dvc"  # the venv's, when imgclf runs from it
    return str(beside) if beside.is_file() else "dvc"


def git(root: Path, *args: str, check: bool = True) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and done.returncode:
        raise ImgclfError(
            f"`git {' '.join(args)}` failed in {root}: {done.stderr.strip() or done.returncode}"
        )
    return done.stdout.strip()


def experiment_ref(root: Path, name: str, baseline: str | None = None) -> str | None:
    """The git ref of experiment `name` (refs/exps/<baseline[:2]>/<baseline[2:]>/<name>); None if
    there is none here."""
    if baseline:
        ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
        return ref if git(root, "rev-parse", "--verify", "--quiet", ref, check=False) else None
    refs = git(root, "for-each-ref", "--format=%(refname)", "refs/exps/", check=False).split()
    return next((ref for ref in refs if ref.rsplit("/", 1)[-1] == name), None)
