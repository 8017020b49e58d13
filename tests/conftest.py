"""Shared fixtures: real data from the embedded digits set, and copies of this repo to run DVC in."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool_env(root: Path) -> dict[str, str]:
    """The environment a user has after `source .venv/bin/activate`, pointed at `root`'s code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(root / "src")
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "imgclf tests"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "tests@imgclf.invalid"
    return env


def run(args: list[str], cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(
        args, cwd=cwd, env=tool_env(cwd), capture_output=True, text=True, timeout=600, **kwargs
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{args} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def copy_repo(dest: Path) -> Path:
    """The repo's tracked and untracked-but-not-ignored files, committed in a fresh git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "copy of imgclf"], dest)
    return dest


@pytest.fixture(scope="session")
def digits_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """data/raw/digits and data/normalized for the default config, made by the real stages' code."""
    from imgclf.config import compose, validate
    from imgclf.data.download import download
    from imgclf.data.normalize import normalize

    root = tmp_path_factory.mktemp("digits")
    config = validate(compose([], REPO / "conf"))
    raw = download(config.data, root / "raw")
    normalize(config.data, config.seed, raw, root / "normalized")
    return raw, root / "normalized"
