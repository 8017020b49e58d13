"""Trials per hour of `imgclf sweep` on digits: one worker, then two at once (bench/results/sweep.json).

Each worker runs in its own clone of one bare git origin, as it would on its own machine, and every
trial is what a distributed sweep does: the whole pipeline (`dvc exp run --temp`, the default
training: at most 40 epochs, early stopping), then `dvc exp push` of the experiment to the origin
and of its outputs to a shared DVC remote folder. The study is one sqlite file that both workers
open (fine on one machine; PostgreSQL for several). Pruning is off so that every trial is whole.

Workers train with one thread: OMP_NUM_THREADS=1 (torch takes it as its intra-op thread count,
checked below) and MKL_NUM_THREADS=1, so that two workers on two cores do not fight over them.
ONNX Runtime in the evaluate stage keeps its own default. Before timing, each clone runs
download and normalize once, so that trials find normalize in DVC's run cache, as in a clone where
the pipeline ran before.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import BenchError, add_override_option, main_guard, row, write_result

from tests.support.repo import copy_repo, git_commit, pipeline_env, run

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TRIAL_LINE = re.compile(r"^trial (\d+)  .*  (\d+) s$", re.MULTILINE)


def clone_env(clone: Path) -> dict[str, str]:
    return pipeline_env(clone) | ONE_THREAD


def set_up(folder: Path, workers: int) -> list[Path]:
    """In `folder`: a bare origin holding a copy of this work tree, a shared DVC remote named in
    its committed .dvc/config, and one clone per worker."""
    origin, outputs, copy = folder / "origin.git", folder / "dvc-remote", copy_repo(folder / "copy")
    run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(origin)], folder)
    run(["dvc", "remote", "add", "-d", "shared", str(outputs)], copy, pipeline_env(copy))
    git_commit(copy, "the shared DVC remote")
    run(["git", "remote", "add", "origin", str(origin)], copy)
    run(["git", "push", "--quiet", "origin", "main"], copy)
    clones = [folder / f"worker{i}" for i in range(workers)]
    for clone in clones:
        run(["git", "clone", "--quiet", str(origin), str(clone)], folder)
        run(["dvc", "repro", "normalize"], clone, clone_env(clone))  # fills this clone's run cache
    return clones


def sweep(clones: list[Path], storage: str, study: str, trials: int, overrides: list[str]) -> dict:
    """Start one worker per clone at once; wall seconds until the last ends, and each trial's seconds."""
    command = ["imgclf", "sweep", "--trials", str(trials), "--storage", storage, "--study", study]
    command += ["sweep.pruning.enabled=false", *overrides]
    started = time.perf_counter()
    workers = [
        subprocess.Popen(
            command,
            cwd=clone,
            env=clone_env(clone),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for clone in clones
    ]
    logs = [worker.communicate()[0] for worker in workers]
    wall = time.perf_counter() - started
    for worker, log in zip(workers, logs, strict=True):
        print(log, flush=True)
        if worker.returncode:
            raise BenchError(f"`{' '.join(command)}` exited {worker.returncode}:\n{log[-3000:]}")
    seconds = [int(s) for log in logs for _, s in TRIAL_LINE.findall(log)]
    if len(seconds) != trials * len(clones):
        raise BenchError(f"expected {trials * len(clones)} trial lines, got {len(seconds)}:\n{logs}")
    return {"wall_s": round(wall, 1), "trial_s": seconds, "trials": len(seconds)}


def torch_threads(clone: Path) -> int:
    code = "import torch; print(torch.get_num_threads())"
    return int(run(["python", "-c", code], clone, clone_env(clone)).strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="trials per worker (default 4)")
    add_override_option(parser)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="imgclf-bench-sweep-"))
    try:
        clones = set_up(folder, 3)
        threads = torch_threads(clones[0])
        load_before = os.getloadavg()
        storage = f"sqlite:///{folder / 'optuna.db'}"
        print(f"one worker, {args.trials} trials ...", flush=True)
        one = sweep(clones[:1], storage, "one", args.trials, args.set)
        print(f"two workers, {args.trials} trials each ...", flush=True)
        two = sweep(clones[1:], storage, "two", args.trials, args.set)
        load_after = os.getloadavg()
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    per_hour = {n: r["trials"] / r["wall_s"] * 3600 for n, r in ((1, one), (2, two))}
    rows = [
        row("trials per hour, 1 worker", round(per_hour[1], 1), "trials/h"),
        row("trials per hour, 2 workers (2 clones, one study)", round(per_hour[2], 1), "trials/h"),
        row("speed-up, 2 workers over 1", round(per_hour[2] / per_hour[1], 2), "x"),
        row("median trial, 1 worker", statistics.median(one["trial_s"]), "s"),
        row("median trial, 2 workers", statistics.median(two["trial_s"]), "s"),
    ]
    details = {
        "one_worker": one,
        "two_workers": two,
        "trials_per_worker": args.trials,
        "overrides": args.set,
        "torch_threads_per_worker": threads,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "cpus": os.cpu_count(),
    }
    write_result("sweep", rows, details)


if __name__ == "__main__":
    main_guard(main)
