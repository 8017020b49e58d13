"""Copies of this work tree, committed in a fresh git repo, and the commands run in them."""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.prefix) / "bin"  # the interpreter running the tests or benchmark, e.g. .venv/bin
# Cached pipeline outputs and local state: a copy must start without them (they are gitignored
# anyway; dvc.lock is dropped too so that `dvc repro` in the copy really starts from scratch).
# metrics/ and plots/*.csv are in git, as in a clone: experiments compare against them.
EXCLUDED = {"data", "models", "mlflow.db", "mlartifacts", "mlruns", ".venv"}
EXCLUDED_FILES = {"dvc.lock"}
GIT_IDENTITY = ["-c", "user.name=imgclf", "-c", "user.email=imgclf@localhost"]
GIT_IDENTITY += ["-c", "commit.gpgsign=false"]


class SetupError(Exception):
    """A command or a server that a test or benchmark needs failed; the message says why."""


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command; return its stdout, or raise SetupError with its output on failure."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stdout + done.stderr).strip()[-3000:]
        raise SetupError(f"`{' '.join(cmd)}` failed with exit code {done.returncode}:\n{tail}")
    return done.stdout


def repo_files(root: Path = ROOT, with_lock: bool = False) -> list[str]:
    """Tracked and untracked-but-not-ignored files of the work tree that exist on disk (without
    dvc.lock unless `with_lock`)."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], root)
    files = [name for name in listed.split("\0") if name]
    return [
        name
        for name in files
        if name.split("/")[0] not in EXCLUDED
        and (with_lock or name not in EXCLUDED_FILES)
        and not name.startswith("bench/results/")
        and (root / name).is_file()
    ]


def copy_repo(dest: Path, root: Path = ROOT, with_lock: bool = False) -> Path:
    """The work tree's files (`repo_files`) copied into `dest`, committed in a fresh git repo.

    What a clean clone of this work tree would hold, uncommitted changes included (and dvc.lock,
    `with_lock`: then `dvc repro` compares against it, as in a clone).
    """
    for name in repo_files(root, with_lock):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    git_commit(dest, "copy of imgclf")
    return dest


@contextlib.contextmanager
def repo_copy(keep: bool = False) -> Iterator[Path]:
    """A temporary `copy_repo`, removed afterwards unless `keep`."""
    folder = Path(tempfile.mkdtemp(prefix="imgclf-copy-"))
    try:
        yield copy_repo(folder)
    finally:
        if keep:
            print(f"kept the copy at {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def git_commit(folder: Path, message: str) -> None:
    if not (folder / ".git").is_dir():
        run(["git", "init", "--quiet", "--initial-branch=main"], folder)
    run(["git", *GIT_IDENTITY, "add", "--all"], folder)
    run(["git", *GIT_IDENTITY, "commit", "--quiet", "--allow-empty", "-m", message], folder)


def pipeline_env(copy: Path) -> dict[str, str]:
    """The venv's tools first on PATH and the copy's sources on PYTHONPATH."""
    env = dict(os.environ)
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "PYTHONHOME"):
        env.pop(name, None)  # the copy must track into its own store, not an outer one
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(copy / "src")
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    env["PYTHONUNBUFFERED"] = "1"
    return env
