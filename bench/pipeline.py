"""Wall time of `dvc repro` from scratch (with per-stage times) and of a no-op `dvc repro`.

Runs in a committed temporary copy of the work tree, without data/, models/, dvc.lock or the
MLflow store. Per-stage times come from when DVC prints "Running stage '<name>'" in the one
full run, so they include DVC's own work between stages (hashing, lock file updates).
"""

import argparse
import json
import re
import statistics

from common import (
    BenchError,
    add_override_option,
    git_commit,
    main_guard,
    pipeline_env,
    repo_copy,
    row,
    run,
    timed,
    timed_lines,
    write_result,
)

SCRATCH_TARGET_S = 40.0
NOOP_TARGET_S = 1.5
TRACKING_SHARE = 0.02  # tracking may cost at most 2% of training time
STAGE_LINE = re.compile(r"Running stage '([^']+)'")


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
        eval_path = copy / "metrics" / "eval.json"
        if not eval_path.is_file():
            raise BenchError("dvc repro finished but wrote no metrics/eval.json")
        evaluation = json.loads(eval_path.read_text(encoding="utf-8"))
        train = json.loads((copy / "metrics" / "train.json").read_text(encoding="utf-8"))

    noop = statistics.median(noops)
    rows = [
        row("dvc repro from scratch", round(scratch, 2), "s", "<=", SCRATCH_TARGET_S),
        *(row(f"  stage {name}", seconds, "s") for name, seconds in stages.items()),
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
        "noop_s": noops,
        "overrides": args.set,
        "eval": evaluation,
        "train": train,
    }
    write_result("pipeline", rows, details)


if __name__ == "__main__":
    main_guard(main)
