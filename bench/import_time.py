"""What importing `imgclf serve`'s module costs, against another commit: per module, not per process.

Whole-process import timings swing by ±10 ms on a shared 2-core machine, more than a change of a
few modules costs. So each side runs `python -X importtime -c "import MODULE"` --runs times,
alternating, and each module's self time is its minimum over the runs; reported: the sum over
all modules on each side, and the modules only one side imports with their self times. The
baseline is --baseline REF checked out in a temporary git worktree (its src/ on PYTHONPATH, the
same virtual environment).
"""

import argparse
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import main_guard, row, write_result

ROOT = Path(__file__).resolve().parent.parent


def self_times(src: Path, module: str) -> dict[str, int]:
    """Each imported module's self time in microseconds, from one `python -X importtime` run."""
    env = os.environ | {"PYTHONPATH": str(src)}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        env=env,
        capture_output=True,
        text=True,
    )
    times = {}
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            own, _, name = line.removeprefix("import time:").split("|")
            times[name.strip()] = int(own)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare with (e.g. 39223c1)")
    parser.add_argument("--module", default="imgclf.serving.server")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-import-") as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(baseline), args.baseline], cwd=ROOT, check=True
        )
        try:
            sides = {args.baseline: baseline / "src", "work tree": ROOT / "src"}
            least = {name: collections.defaultdict(lambda: sys.maxsize) for name in sides}
            for _ in range(args.runs):
                for name, src in sides.items():
                    for module, own in self_times(src, args.module).items():
                        least[name][module] = min(least[name][module], own)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, check=True)
    before, after = (least[name] for name in sides)
    rows = [
        row(f"{name}: sum of module self times", round(sum(t.values()) / 1000, 1), "ms")
        for name, t in least.items()
    ]
    rows.append(row("difference", round((sum(after.values()) - sum(before.values())) / 1000, 1), "ms"))
    only = {
        "only in the work tree": {m: after[m] for m in sorted(set(after) - set(before))},
        f"only in {args.baseline}": {m: before[m] for m in sorted(set(before) - set(after))},
    }
    for what, modules in only.items():
        print(f"{what}: " + ", ".join(f"{m} {t / 1000:.1f} ms" for m, t in modules.items()))
    write_result("import_time", rows, {"module": args.module, "runs": args.runs, **only})


if __name__ == "__main__":
    main_guard(main)
