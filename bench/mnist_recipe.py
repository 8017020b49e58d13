"""The `mnist_cnn` recipe on the real MNIST: test accuracy and the train stage's wall time.

In a committed temporary copy of the work tree: `imgclf params experiment=mnist_cnn` with the
MNIST files in ../shared/datasets/mnist as a file:// mirror, `dvc repro normalize` (not timed),
then `dvc repro train` timed as a whole process, then `dvc repro` for export and evaluate.
"""

import argparse
from pathlib import Path

from common import (
    ROOT,
    BenchError,
    add_override_option,
    main_guard,
    pipeline_metrics,
    row,
    timed,
    write_result,
)

from tests.support.repo import pipeline_env, repo_copy, run

ACCURACY_TARGET = 0.993
TRAIN_STAGE_TARGET_S = 75.0
MNIST = ROOT.parent / "shared" / "datasets" / "mnist"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="mnist_cnn")
    parser.add_argument("--mnist", default=str(MNIST), help="folder with the four IDX .gz files")
    add_override_option(parser)
    args = parser.parse_args()
    folder = Path(args.mnist).resolve()
    if not list(folder.glob("*-ubyte.gz")):
        raise BenchError(f"no MNIST IDX files (*-ubyte.gz) in {folder}; pass --mnist <folder>")
    mirror = folder.as_uri() + "/"

    with repo_copy() as copy:
        env = pipeline_env(copy)
        overrides = [f"experiment={args.experiment}", f"data.mirrors=[{mirror}]", *args.set]
        run(["imgclf", "params", *overrides], copy, env)
        print(f"imgclf params {' '.join(overrides)} && dvc repro normalize ...", flush=True)
        run(["dvc", "repro", "normalize"], copy, env)
        print("dvc repro train (timed) ...", flush=True)
        train_s = timed(["dvc", "repro", "train"], copy, env)
        run(["dvc", "repro"], copy, env)
        train = pipeline_metrics(copy, "train")
        evaluation = pipeline_metrics(copy, "eval")
    rows = [
        row(f"{args.experiment} test accuracy", evaluation["accuracy"], "", ">=", ACCURACY_TARGET),
        row(f"{args.experiment} train stage wall", round(train_s, 1), "s", "<=", TRAIN_STAGE_TARGET_S),
        row(f"{args.experiment} fit only", train["train_seconds"], "s"),
        row(f"{args.experiment} training throughput", train["train_images_per_s"], "img/s"),
    ]
    details = {"overrides": overrides, "train": train, "eval": evaluation, "train_stage_s": train_s}
    write_result("mnist_recipe", rows, details)


if __name__ == "__main__":
    main_guard(main)
