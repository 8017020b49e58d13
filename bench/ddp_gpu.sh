#!/usr/bin/env bash
# DDP on GPUs (nccl) with the real train stage, for a machine that has CUDA GPUs. Not run by the
# tests and not needed on CPU-only machines: there, bench/ddp.py and tests/e2e/test_ddp.py check
# DDP over gloo. Run from the repo root:   bench/ddp_gpu.sh   (PYTHON=... for another interpreter)
#
# In a scratch folder, on the digits set (default config, dropout and augmentation off, 5 epochs,
# the train split cut to a multiple of 2 and N so that every layout trains on the same images),
# each case runs dvc.yaml's train command and is checked against the first:
#   one-gpu     trainer=auto, one process on GPU 0, train.batch_size=128
#   ddp-N       trainer=ddp trainer.accelerator=gpu trainer.devices=N (every GPU, N >= 2), 128/N each:
#               N processes, nccl, the same optimizer steps as one-gpu, one MLflow run (the
#               weights are compared where N divides 128: the same global batch)
#   two-nodes   N >= 2: two "nodes" on 127.0.0.1 (NODE_RANK 0 and 1, CUDA_VISIBLE_DEVICES 0 and 1),
#               trainer.devices=1 trainer.num_nodes=2, 64 each: the multi-node path over nccl
#   ddp-1       N == 1: trainer=ddp trainer.devices=1 (a world of one, nccl)
#   shared-gpu  N == 1: two "nodes" on the one GPU. NCCL refuses a communicator that holds one GPU
#               twice ("Duplicate GPU detected"): reported, not counted as a failure
# Weights are compared with one-gpu and the difference printed: GPU sums are not bitwise
# reproducible across process layouts, so the check is loose (1e-4).
# Exit code: 0 all checks passed, 1 a check failed, 2 no CUDA GPU visible to torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
exec "$PYTHON" - <<'EOF'
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path.cwd()
EPOCHS = 5
BASE = ["model.dropout=0.0", "train.augment.invert=false", f"train.max_epochs={EPOCHS}"]

if not torch.cuda.is_available():
    print(f"no CUDA GPU visible to torch {torch.__version__} (a CPU build?): nothing to check")
    sys.exit(2)
gpus = torch.cuda.device_count()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {torch.cuda.nccl.version()}, {gpus} GPU(s):")
for index in range(gpus):
    print(f"  {index}: {torch.cuda.get_device_name(index)}")

from imgclf.config import compose, validate, write_params  # noqa: E402
from imgclf.data.download import download  # noqa: E402
from imgclf.data.normalize import normalize  # noqa: E402

scratch = Path(tempfile.mkdtemp(prefix="imgclf-ddp-gpu-"))
config = validate(compose([], ROOT / "conf"))
download(config.data, scratch / "data" / "raw" / "digits")
normalize(config.data, config.seed, scratch / "data" / "raw" / "digits", scratch / "data" / "normalized")
# N processes each take an equal share of an epoch: with a count that N does not divide, they leave
# out images that one process trains on, and the weights would differ for that reason alone.
train = scratch / "data" / "normalized" / "train"
arrays = {name: np.load(train / f"{name}.npy") for name in ("images", "labels")}
keep = len(arrays["labels"]) // math.lcm(2, gpus) * math.lcm(2, gpus)
for name, array in arrays.items():
    np.save(train / f"{name}.npy", array[:keep])
cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["cmd"]
cmd = shlex.split(cmd.replace("${data.name}", "digits"))
cmd[0] = sys.executable
cmd[1] = str(ROOT / cmd[1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def case(name: str, overrides: list[str], nodes: list[dict] | None = None, timeout: int = 300) -> dict:
    """Run the stage in scratch/<name> (one process, or one per entry of `nodes`); what it did."""
    folder = scratch / name
    folder.mkdir()
    (folder / "data").symlink_to(scratch / "data")
    write_params([*BASE, *overrides], ROOT / "conf", folder / "params.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db", "NCCL_DEBUG": "INFO"}
    started = time.perf_counter()
    procs = [
        subprocess.Popen(cmd, cwd=folder, env=env | extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for extra in (nodes or [{}])
    ]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
    seconds = time.perf_counter() - started
    result = {"name": name, "rc": [p.returncode for p in procs], "log": "\n".join(logs), "seconds": seconds}
    ckpt = folder / "models" / "model.ckpt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        result["global_step"] = state["global_step"]
        result["weights"] = state["state_dict"]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
        result["runs"] = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
        result["metrics"] = json.loads((folder / "metrics" / "train.json").read_text())
    print(f"{name}: exit {result['rc']}, {seconds:.1f} s", flush=True)
    return result


failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)


def compare(result: dict, processes: int, baseline: dict, same_batch: bool = True) -> None:
    check(result["rc"] == [0] * len(result["rc"]), f"{result['name']}: every process exits 0")
    if "weights" not in result:
        print(result["log"][-3000:])
        check(False, f"{result['name']}: a checkpoint was written")
        return
    if processes > 1:
        line = f"DDP: {processes} processes"
        check(line in result["log"], f"{result['name']}: '{line}'")
        check("NCCL INFO" in result["log"], f"{result['name']}: nccl set up the process group")
    check(result["runs"] == 1, f"{result['name']}: one MLflow run ({result['runs']})")
    check(result["metrics"]["processes"] == processes, f"{result['name']}: metrics say {processes} processes")
    if baseline is result:
        return
    steps = (result["global_step"], baseline["global_step"])
    diff = max(float((result["weights"][k] - baseline["weights"][k]).abs().max()) for k in baseline["weights"])
    if same_batch:
        check(steps[0] == steps[1], f"{result['name']}: optimizer steps {steps[0]} == one-gpu's {steps[1]}")
        check(diff < 1e-4, f"{result['name']}: weights within 1e-4 of one-gpu's (max |diff| {diff:.2e})")
    else:
        print(f"  info {result['name']}: another global batch than one-gpu's: {steps[0]} steps, max |diff| {diff:.2e}")


baseline = case("one-gpu", ["trainer=auto", "train.batch_size=128"])
compare(baseline, 1, baseline)
if gpus >= 2:
    result = case(f"ddp-{gpus}", ["trainer=ddp", "trainer.accelerator=gpu", f"trainer.devices={gpus}",
                                  f"train.batch_size={128 // gpus}"])
    compare(result, gpus, baseline, same_batch=128 % gpus == 0)
    launch = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    nodes = [launch | {"NODE_RANK": str(rank), "CUDA_VISIBLE_DEVICES": str(rank)} for rank in (0, 1)]
    overrides = ["trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=1", "trainer.num_nodes=2",
                 "train.batch_size=64"]
    compare(case("two-nodes", overrides, nodes), 2, baseline)
else:
    compare(case("ddp-1", ["trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=1",
                           "train.batch_size=128"]), 1, baseline)
    launch = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    nodes = [launch | {"NODE_RANK": str(rank)} for rank in (0, 1)]
    overrides = ["trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=1", "trainer.num_nodes=2",
                 "train.batch_size=64"]
    shared = case("shared-gpu", overrides, nodes, timeout=120)
    refused = "Duplicate GPU" in shared["log"] or "invalid usage" in shared["log"].lower()
    print(f"  info two processes on one GPU: exit {shared['rc']}"
          + (", NCCL refused the duplicate GPU as expected" if refused else ""))
    if not refused:
        print(shared["log"][-2000:])

shutil.rmtree(scratch, ignore_errors=True)
print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
sys.exit(1 if failures else 0)
EOF
