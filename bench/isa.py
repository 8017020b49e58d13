"""The train stage under two CPU instruction-set caps (imgclf.stages.cpu): same files? what does a cap cost?

Runs in a committed temporary copy of the work tree: `dvc repro export` once (uncapped), then
`dvc repro -f -s train export` --runs times per cap, the caps taking turns so that both see the
same load on shared cores. Each run's weights (md5 of the checkpoint's state dict) and
models/model.onnx are hashed. A cap must give the same files on every run (the target);
whether two caps agree says which kernels this CPU picks natively (on a CPU with AVX-512,
`native` and `avx512` agree and `avx2` differs). The cost is the stage's own fit time
(metrics/local/train.json train_seconds), best of the runs (other work on shared cores only ever
adds time, by 2-5x on 2 busy cores), of the second cap against the first. The weights also depend on
the number of threads: compare runs with the same OMP_NUM_THREADS.
The three variables are removed from the environment first: a user's own would override the cap.
"""

import argparse
import hashlib
from pathlib import Path

from common import add_override_option, main_guard, pipeline_metrics, row, write_result

from imgclf.stages.cpu import CPU_ISA_ENV, CPU_ISA_VARIABLES, cap_cpu_isa
from tests.support.repo import git_commit, pipeline_env, repo_copy, run

REPRO_STAGES = ["dvc", "repro", "--force", "--single-item", "train", "export"]


def weights_md5(checkpoint: Path) -> str:
    """md5 of the checkpoint's tensors, in key order: what training computed, nothing else."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    digest = hashlib.md5()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_once(copy: Path, env: dict[str, str]) -> dict:
    run(REPRO_STAGES, copy, env)
    train = pipeline_metrics(copy, "train")
    return {
        "weights_md5": weights_md5(copy / "models" / "model.ckpt"),
        "onnx_md5": hashlib.md5((copy / "models" / "model.onnx").read_bytes()).hexdigest(),
        "train_seconds": train["train_seconds"],
        "train_images_per_s": train["train_images_per_s"],
        "val_loss": train["val_loss"],
        "epochs": train["epochs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "caps", nargs="*", default=["native", "avx2"], help="two of " + ", ".join(CPU_ISA_ENV)
    )
    parser.add_argument(
        "--runs", type=int, default=2, help="train runs per cap (at least 2: reruns are compared)"
    )
    add_override_option(parser)
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args()
    if len(args.caps) != 2 or not set(args.caps) <= set(CPU_ISA_ENV) or args.runs < 2:
        parser.error(f"expected two caps of {', '.join(CPU_ISA_ENV)} and --runs >= 2")

    runs: dict[str, list[dict]] = {cap: [] for cap in args.caps}
    with repo_copy(keep=args.keep) as copy:
        base = {k: v for k, v in pipeline_env(copy).items() if k not in CPU_ISA_VARIABLES}
        # The config leaves every library free (`native`); each run's cap is its environment's.
        run(["imgclf", "params", "trainer.cpu_isa=native", *args.set], copy, base)
        git_commit(copy, f"benchmark overrides {['trainer.cpu_isa=native', *args.set]}")
        print(f"dvc repro export in {copy} ...", flush=True)
        run(["dvc", "repro", "export"], copy, base)
        for turn in range(args.runs):
            for cap in args.caps:
                env = dict(base)
                cap_cpu_isa(cap, env)
                print(f"train under {cap} ({turn + 1}/{args.runs}) ...", flush=True)
                runs[cap].append(train_once(copy, env))

    first, second = args.caps
    fit = {cap: min(r["train_seconds"] for r in runs[cap]) for cap in args.caps}
    rows = []
    for cap in args.caps:
        same = len({(r["weights_md5"], r["onnx_md5"]) for r in runs[cap]}) == 1
        rows += [
            row(f"{cap}: fit (best of {args.runs})", fit[cap], "s"),
            row(f"{cap}: train images/s", max(r["train_images_per_s"] for r in runs[cap]), "/s"),
            row(f"{cap}: reruns give the same weights and model.onnx", int(same), "", ">=", 1),
        ]
    agree = runs[first][0]["onnx_md5"] == runs[second][0]["onnx_md5"]
    rows += [
        row(f"fit time {second} / {first}", round(fit[second] / fit[first], 3), "x"),
        row(f"{first} and {second} give the same model.onnx", int(agree)),
    ]
    details = {"caps": {cap: CPU_ISA_ENV[cap] for cap in args.caps}, "runs": runs, "overrides": args.set}
    write_result("isa", rows, details)


if __name__ == "__main__":
    main_guard(main)
