"""Does `make run` on a clean clone give back the committed dvc.lock and metrics/, byte for byte?

    python -m tests.support.reproduce [ROOT] [--keep]      (`make reproduce`; CI: tests/e2e/test_reproduce.py)

The work tree's files (uncommitted changes included, as `tests.support.repo.copy_repo` copies
them) go into a fresh repository, with dvc.lock but without data/, models/ or the MLflow store,
as a clone has them; `make run` runs there; then `git status` must be empty. Each file that
changed is reported with its first differing line, as committed and as reproduced. Exit 0 when
everything reproduced, 1 when not, 2 when `make run` itself failed.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.repo import ROOT, copy_repo, pipeline_env

HUNK = re.compile(r"^@@ -(\d+)(?:,\d+)? \+\d+(?:,\d+)? @@")


def differences(clone: Path) -> list[str]:
    """One line per file that `make run` changed or added: where, as committed, as reproduced."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone, capture_output=True, text=True
    ).stdout
    lines = []
    for entry in status.splitlines():
        name = entry[3:]
        if not entry.startswith(" M"):
            lines.append(f"{name}: {'new, and not git-ignored' if entry.startswith('??') else entry[:2]}")
            continue
        diff = subprocess.run(
            ["git", "diff", "--unified=0", "--", name], cwd=clone, capture_output=True, text=True
        ).stdout.splitlines()
        start = next(i for i, line in enumerate(diff) if HUNK.match(line))
        removed = [line[1:].strip() for line in diff[start + 1 :] if line.startswith("-")][:1]
        added = [line[1:].strip() for line in diff[start + 1 :] if line.startswith("+")][:1]
        where = HUNK.match(diff[start]).group(1)
        lines.append(
            f"{name}:{where}: committed {removed[0] if removed else '(nothing)'!r}, "
            f"reproduced {added[0] if added else '(nothing)'!r}"
        )
    return lines


def reproduce(root: Path, folder: Path) -> tuple[int, list[str]]:
    """(exit code of `make run`, the differences) for a clean copy of `root` made in `folder`."""
    clone = copy_repo(folder, root, with_lock=True)
    done = subprocess.run(
        ["make", "-o", "install", "run"], cwd=clone, env=pipeline_env(clone), capture_output=True, text=True
    )
    if done.returncode:
        return done.returncode, [(done.stdout + done.stderr).strip()[-3000:]]
    return 0, differences(clone)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=ROOT, help="the work tree (default: this one)")
    parser.add_argument("--keep", action="store_true", help="keep the clean copy for a closer look")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="imgclf-reproduce-"))
    try:
        print(f"make run in a clean copy of {args.root.resolve()} ...", flush=True)
        code, found = reproduce(args.root, folder)
    finally:
        if args.keep:
            print(f"kept the copy at {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    if code:
        print(f"reproduce: `make run` failed (exit {code}):\n{found[0]}", file=sys.stderr)
        return 2
    for line in found:
        print(f"reproduce: {line}", file=sys.stderr)
    if found:
        print(
            f"reproduce: {len(found)} file(s) differ from what `make run` makes on a clean clone: "
            "commit the pipeline's results after `dvc repro` (or find what is not deterministic)",
            file=sys.stderr,
        )
        return 1
    print("reproduce: dvc.lock, metrics/ and plots/ are exactly what `make run` makes; git status is clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
