"""Wall time of `dvc repro` from scratch (with per-stage times) and of a no-op `dvc repro`.

Runs in a committed temporary copy of the work tree, without data/, models/, dvc.lock or the
MLflow store. Per-stage times come from when DVC prints "Running stage '<name>'" in the one
full run, so they include DVC's own work between stages (hashing, lock file updates).

Then each stage's command runs once more on its own under `python -X importtime`: its wall time
there, and the share of it the stage process spent importing (the top-level imports' cumulative
times; the profiler inflates them somewhat). The tracking worker (imgclf.tracking.worker) imports mlflow
in parallel, on the other core: its imports are profiled apart, as "(tracking worker)".
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import (
    BenchError,
    add_override_option,
    main_guard,
    pipeline_metrics,
    row,
    timed,
    timed_lines,
    write_result,
)

from tests.support.repo import git_commit, pipeline_env, repo_copy, run

SCRATCH_TARGET_S = 15.0
NOOP_TARGET_S = 1.5
TRACKING_SHARE = 0.02  # tracking may cost at most 2% of training time
STAGE_LINE = re.compile(r"Running stage '([^']+)'")
IMPORT_LINE = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$")  # top level: one space


def import_seconds(stderr: str) -> tuple[float, dict[str, float]]:
    """Seconds of top-level imports in `python -X importtime` output, and the 5 costliest packages."""
    packages: dict[str, float] = {}
    for line in stderr.splitlines():
        if match := IMPORT_LINE.match(line):
            package = match.group(2).split(".")[0]
            packages[package] = packages.get(package, 0.0) + int(match.group(1)) / 1e6
    top = dict(sorted(packages.items(), key=lambda item: -item[1])[:5])
    return sum(packages.values()), {name: round(seconds, 2) for name, seconds in top.items()}


# Runs a stage script under -X importtime, which multiprocessing passes on to the processes it
# spawns: the tracking worker's imports would be counted as the stage's. The worker is profiled apart.
PROFILED = """
import runpy, subprocess, sys
flags = subprocess._args_from_interpreter_flags
subprocess._args_from_interpreter_flags = lambda: [a for a in flags() if a not in ("-X", "importtime")]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def profile_stages(copy: Path, env: dict[str, str]) -> dict[str, dict]:
    """Each stage's command again, alone, under `python -X importtime`: wall and import seconds."""
    stages = yaml.safe_load((copy / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    data_name = yaml.safe_load((copy / "params.yaml").read_text(encoding="utf-8"))["data"]["name"]
    profiles = {}
    for name, stage in stages.items():
        command = stage["cmd"].replace("${data.name}", data_name).split()
        assert command[0] == "python", command
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", PROFILED, *command[1:]],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - started
        if done.returncode:
            raise BenchError(f"stage {name} under -X importtime failed:\n{done.stderr[-2000:]}")
        seconds, top = import_seconds(done.stderr)
        profiles[name] = {"wall_s": round(wall, 2), "import_s": round(seconds, 2), "top": top}
    # What the tracking worker imports first.
    code = "import imgclf.tracking.worker, imgclf.tracking.client, mlflow.tracking"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=copy, env=env, capture_output=True, text=True
    )
    seconds, top = import_seconds(done.stderr)
    profiles["(tracking worker)"] = {"wall_s": None, "import_s": round(seconds, 2), "top": top}
    return profiles


def stage_seconds(total: float, lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds from each "Running stage" line to the next one (the last: to the end).

    "(dvc start)" is the time before the first stage: DVC's start-up and pipeline checks.
    """
    starts = [(0.0, "(dvc start)")]
    starts += [(t, m.group(1)) for t, line in lines if (m := STAGE_LINE.search(line))]
    ends = [t for t, _ in starts[1:]] + [total]
    return {name: round(end - start, 3) for (start, name), end in zip(starts, ends, strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noop-runs", type=int, default=3, help="no-op repros (median)")
    add_override_option(parser)
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args()

    with repo_copy(keep=args.keep) as copy:
        env = pipeline_env(copy)
        if args.set:
            run(["imgclf", "params", *args.set], copy, env)
            git_commit(copy, f"benchmark overrides {args.set}")
        print(f"dvc repro from scratch in {copy} ...", flush=True)
        scratch, lines = timed_lines(["dvc", "repro"], copy, env)
        stages = stage_seconds(scratch, lines)
        noops = [timed(["dvc", "repro"], copy, env) for _ in range(args.noop_runs)]
        profiles = profile_stages(copy, env)
        eval_path = copy / "metrics" / "eval.json"
        if not eval_path.is_file():
            raise BenchError("dvc repro finished but wrote no metrics/eval.json")
        evaluation = json.loads(eval_path.read_text(encoding="utf-8"))
        train = pipeline_metrics(copy, "train")

    noop = statistics.median(noops)
    rows = [
        row("dvc repro from scratch", round(scratch, 2), "s", "<=", SCRATCH_TARGET_S),
        *(row(f"  stage {name}", seconds, "s") for name, seconds in stages.items()),
        *(
            row(f"  {name}: imports, in parallel with its stage", p["import_s"], "s")
            if p["wall_s"] is None
            else row(
                f"  {name}: imports, share of its -X importtime run ({p['wall_s']} s)",
                round(p["import_s"] / p["wall_s"], 2),
            )
            for name, p in profiles.items()
        ),
        row(f"dvc repro no-op (median of {len(noops)})", round(noop, 3), "s", "<=", NOOP_TARGET_S),
        row("test accuracy", evaluation["accuracy"]),
        row("test macro F1", evaluation["macro_f1"]),
        row("train epochs", train["epochs"]),
        row("train: fit", train["train_seconds"], "s"),
        row(
            "train: MLflow writes, share of fit",
            round(train["tracking_seconds"] / train["train_seconds"], 4),
            "",
            "<=",
            TRACKING_SHARE,
        ),
    ]
    details = {
        "scratch_s": scratch,
        "stage_s": stages,
        "stage_imports": profiles,
        "noop_s": noops,
        "overrides": args.set,
        "eval": evaluation,
        "train": train,
    }
    write_result("pipeline", rows, details)


if __name__ == "__main__":
    main_guard(main)
