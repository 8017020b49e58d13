"""Digits test accuracy and macro F1 of each model, through the real pipeline.

In one committed temporary copy of the work tree: `imgclf params model=<m>` then `dvc repro`
for each model in turn (download and normalize run once and are reused), reading
metrics/eval.json after each.
"""

import argparse
import time

from common import add_override_option, main_guard, pipeline_metrics, row, write_result

from tests.support.repo import pipeline_env, repo_copy, run

TARGETS = {"cnn": 0.98}  # minimum test accuracy per model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    add_override_option(parser)
    args = parser.parse_args()

    rows, details = [], {"overrides": args.set}
    with repo_copy() as copy:
        env = pipeline_env(copy)
        for model in args.models:
            print(f"{model}: imgclf params model={model} && dvc repro ...", flush=True)
            run(["imgclf", "params", f"model={model}", *args.set], copy, env)
            started = time.perf_counter()
            run(["dvc", "repro"], copy, env)
            seconds = time.perf_counter() - started
            metrics = pipeline_metrics(copy, "eval")
            train = pipeline_metrics(copy, "train")
            target = TARGETS.get(model)
            op = ">=" if target is not None else None
            rows += [
                row(f"{model} test accuracy", metrics["accuracy"], "", op, target),
                row(f"{model} test macro F1", metrics["macro_f1"]),
            ]
            details[model] = {
                "accuracy": metrics["accuracy"],
                "macro_f1": metrics["macro_f1"],
                "n_test": metrics["n_test"],
                "epochs": train["epochs"],
                "best_epoch": train["best_epoch"],
                "repro_s": round(seconds, 2),
            }
    write_result("accuracy", rows, details)


if __name__ == "__main__":
    main_guard(main)
