"""The registry's read commands against a real `mlflow server`: `imgclf models`, `imgclf promote
--dry-run`, and `imgclf predict --model models:/<name>@champion` (first call, with an empty cache
of downloaded versions, then again), beside `imgclf predict` on the ONNX file itself.

In a committed temporary copy of the work tree, `dvc repro` runs on digits tracking into a server
started on 127.0.0.1 (as in CI), then `imgclf register` and `imgclf promote` make its model the
champion; a second `dvc repro` with `train.max_epochs=2` leaves an unregistered model for
`promote --dry-run` to gate against it (what CI's `make gate` does on a pull request). Each
command runs as a user runs it, a fresh process (`imgclf ...`), wall time, median of --runs, with
the cache in a temporary $XDG_CACHE_HOME. `--baseline REF` does all of it again in a copy of git
commit REF (its own pipeline, server and registry), for a before/after.
"""

import argparse
import contextlib
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from common import ROOT, BenchError, main_guard, row, write_result

from tests.support.repo import VENV_BIN, git_commit, pipeline_env, repo_copy, run
from tests.support.servers import mlflow_server

MODELS_TARGET_S = 1.5
PREDICT_TARGET_S = 1.5  # a second call, the version cached
DRY_RUN_TARGET_S = 3.0
# (label, figure, (op, target) or ())
ROWS = [
    ("imgclf models", "models_s", ("<=", MODELS_TARGET_S)),
    ("imgclf promote --dry-run", "promote_dry_run_s", ("<=", DRY_RUN_TARGET_S)),
    ("imgclf predict models:/…@champion, first call", "predict_registry_first_s", ()),
    ("imgclf predict models:/…@champion, again", "predict_registry_s", ("<=", PREDICT_TARGET_S)),
    ("imgclf predict models/model.onnx", "predict_file_s", ()),
]
CLI = "from imgclf.cli import main; main()"  # `imgclf ARGS` as python -c CLI ARGS
# The registered model's name, as the copy's params.yaml has it.
NAME = "import yaml; print(yaml.safe_load(open('params.yaml'))['registry']['model_name'])"
PERMISSIVE = ["promote.min_improvement=-1", "promote.max_class_recall_drop=1", "promote.min_value=0"]


def imgclf(args: list[str], copy: Path, env: dict) -> tuple[float, str]:
    """(wall seconds, stdout) of one `imgclf ARGS` in `copy`; BenchError if it fails (a dry run
    whose gates fail, exit code 1, is a normal outcome)."""
    started = time.perf_counter()
    done = subprocess.run(
        [str(VENV_BIN / "imgclf"), *args], cwd=copy, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode not in ((0, 1) if "--dry-run" in args else (0,)):
        raise BenchError(f"imgclf {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout


def imports_mlflow(args: list[str], copy: Path, env: dict) -> bool:
    """Whether `imgclf ARGS` imports mlflow (python -X importtime)."""
    command = [str(VENV_BIN / "python"), "-X", "importtime", "-c", CLI, *args]
    done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)
    if done.returncode not in ((0, 1) if "--dry-run" in args else (0,)):
        raise BenchError(f"imgclf {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return any(line.rsplit("|", 1)[-1].strip() == "mlflow" for line in done.stderr.splitlines())


def time_commands(copy: Path, env: dict, name: str, runs: int) -> dict:
    """Median wall seconds of each command, and whether it imports mlflow."""
    image = copy / "digit.png"
    uri = f"models:/{name}@champion"
    commands = {
        "models": ["models"],
        "promote_dry_run": ["promote", "--dry-run"],
        "predict_registry": ["predict", "--model", uri, str(image)],
        "predict_file": ["predict", "--model", "models/model.onnx", str(image)],
    }
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="imgclf-cache-") as cache:
        env = env | {"XDG_CACHE_HOME": cache}
        figures["predict_registry_first_s"] = round(imgclf(commands["predict_registry"], copy, env)[0], 3)
        for key, args in commands.items():
            imgclf(args, copy, env)  # the OS's file cache warm, as on any second call
            seconds = [imgclf(args, copy, env)[0] for _ in range(runs)]
            figures[f"{key}_s"] = round(statistics.median(seconds), 3)
            figures[f"{key}_imports_mlflow"] = imports_mlflow(args, copy, env)
    return figures


@contextlib.contextmanager
def baseline_copy(ref: str, keep: bool) -> Iterator[Path]:
    """The files of git commit `ref` of this repository, committed in a fresh git repo."""
    folder = Path(tempfile.mkdtemp(prefix="imgclf-baseline-"))
    try:
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True)
        if archive.returncode:
            raise BenchError(f"git archive {ref}: {archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
        (folder / "dvc.lock").unlink(missing_ok=True)  # a pipeline from scratch, as repo_copy's
        git_commit(folder, f"imgclf at {ref}")
        yield folder
    finally:
        if keep:
            print(f"kept the copy at {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def measured(copy: Path, runs: int) -> dict:
    """In `copy`, against a server of its own: a champion and an unregistered challenger made by
    the pipeline, then the commands timed."""
    with tempfile.TemporaryDirectory(prefix="imgclf-server-") as folder, mlflow_server(Path(folder)) as url:
        env = pipeline_env(copy) | {"MLFLOW_TRACKING_URI": url}
        env = {k: v for k, v in env.items() if k not in ("XDG_CACHE_HOME", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")}
        print(f"dvc repro in {copy}, tracking into {url} ...", flush=True)
        run(["dvc", "repro"], copy, env)
        imgclf(["register"], copy, env)
        imgclf(["promote", *PERMISSIVE], copy, env)
        name = run([str(VENV_BIN / "python"), "-c", NAME], copy, env).strip()
        run([str(VENV_BIN / "imgclf"), "params", "train.max_epochs=2"], copy, env)
        print("dvc repro with train.max_epochs=2: a challenger for promote --dry-run ...", flush=True)
        run(["dvc", "repro"], copy, env)
        digit_png(copy)
        return time_commands(copy, env, name, runs)


def digit_png(copy: Path) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.load(copy / "data" / "normalized" / "test" / "images.npy")[0, 0]
    Image.fromarray(pixels, "L").save(copy / "digit.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each command (median)")
    parser.add_argument("--baseline", metavar="REF", help="also time git commit REF, in a copy of its own")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = parser.parse_args()
    with repo_copy(keep=args.keep) as copy:
        after = measured(copy, args.runs)
    before = None
    if args.baseline:
        with baseline_copy(args.baseline, args.keep) as copy:
            before = measured(copy, args.runs)
    rows = [row(label, after[key], "s", *target) for label, key, target in ROWS]
    if before:
        rows += [row(f"{args.baseline}: {label}", before[key], "s") for label, key, _ in ROWS]
    details = {"after": after, "before": before, "baseline": args.baseline, "runs": args.runs}
    details["server"] = "mlflow server --workers 1, sqlite, artifacts proxied, on 127.0.0.1"
    write_result("registry_cli", rows, details)


if __name__ == "__main__":
    main_guard(main)
