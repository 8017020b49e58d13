"""DDP on CPU: processes share each training epoch, on one machine or on several "nodes".

The nodes are two processes of the real train stage on 127.0.0.1, each in its own copy of the
repo, as two machines would hold one each, started as README "Scaling out" says: the same commit
and params, NODE_RANK 0 and 1, the first node's address and port.
"""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, tool_env
from tests.support.repo import copy_repo, git_commit
from tests.support.servers import free_port

SCRIPT = """
import sys
from pathlib import Path
import lightning as L
from imgclf.config.compose import compose
from imgclf.config.operations import validate
from imgclf.data.datamodule import ImageDataModule
from imgclf.data.normalized import load_card
from imgclf.models import build_model
from imgclf.stages.training.module import ImageClassifier


class Recording(ImageClassifier):
    def on_train_epoch_start(self):
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen += batch[1].tolist()
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self):
        print(f"rank {self.global_rank} saw {len(self.seen)} images", flush=True)


if __name__ == "__main__":
    config = validate(compose(["model.hidden=[16]", "train.batch_size=64"], sys.argv[2]))
    datamodule = ImageDataModule(sys.argv[1], batch_size=64, seed=0, augment=config.train.augment)
    net = build_model(config.model, load_card(Path(sys.argv[1])))
    module = Recording(net, config.train)
    L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(module, datamodule=datamodule)
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_two_cpu_processes_each_train_on_half_the_epoch(digits_dirs, tmp_path):
    from imgclf.data.normalized import load_split

    _, normalized = digits_dirs
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(normalized), str(REPO / "conf")],
        cwd=tmp_path,
        env=tool_env(REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    n_train = len(load_split(normalized, "train")[1])
    # Two processes write to one pipe: their lines may run together, so match, don't split.
    seen = sorted(re.findall(r"rank (\d) saw (\d+) images", done.stdout))
    # Without sharding each would see all n_train; which images is the unit tests' business.
    assert seen == [("0", str(n_train // 2)), ("1", str(n_train // 2))]


# --- the train stage itself, as `dvc repro` runs it ---------------------------------------------

EPOCHS = 3
# A small MLP without randomness in training: no dropout, no augmentation (digits turns invert on);
# the MLP has no batch norm. What is left to differ is the order of floating-point sums.
SMALL = ["model.hidden=[32]", "model.dropout=0.0", "train.augment.invert=false", f"train.max_epochs={EPOCHS}"]
TWO_NODES = ["trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2", "train.batch_size=64"]
ONE_PROCESS = ["trainer=cpu", "train.batch_size=128"]  # the same global batch: 2 x 64
OUTPUTS = ("models/model.ckpt", "metrics/train.json", "plots/train_curves.csv", "plots/train_curves.png")


def stage_command() -> list[str]:
    """The train stage's `cmd:` from dvc.yaml, as a node other than the first runs it."""
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["cmd"]
    return shlex.split(cmd.replace("${data.name}", "digits"))


@pytest.fixture(scope="module")
def even_digits(digits_dirs, tmp_path_factory) -> tuple[Path, Path]:
    """The digits raw and normalized folders, with an even number of training images.

    Each DDP process takes an equal share of an epoch, so with an odd count two processes leave
    one image out of each epoch that one process trains on; the comparison needs the same images.
    """
    from imgclf.data.normalized import load_split

    raw, normalized = digits_dirs
    even = tmp_path_factory.mktemp("even") / "normalized"
    shutil.copytree(normalized, even)
    images, labels = load_split(normalized, "train")
    n = len(labels) // 2 * 2
    np.save(even / "train" / "images.npy", images[:n])
    np.save(even / "train" / "labels.npy", labels[:n])
    return raw, even


def machine(root: Path, data: tuple[Path, Path], overrides: list[str]) -> Path:
    """A copy of the repo at a commit with params.yaml composed from `overrides`, and its data."""
    from imgclf.config.compose import write_params

    copy_repo(root)
    write_params(overrides, root / "conf", root / "params.yaml")
    git_commit(root, "params")
    raw, normalized = data
    shutil.copytree(raw, root / "data" / "raw" / "digits")
    shutil.copytree(normalized, root / "data" / "normalized")
    return root


def stage_env(root: Path, store: Path, **launch: str) -> dict[str, str]:
    return tool_env(root) | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
        "OMP_NUM_THREADS": "1",  # two "machines" on 2 cores: one each
        "PYTHONDONTWRITEBYTECODE": "1",  # so that nothing but the stage writes into a copy
        **launch,
    }


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file()
    }


def mlflow_runs(store: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments)


@pytest.fixture(scope="module")
def two_nodes(even_digits, tmp_path_factory) -> dict:
    """Two nodes on 127.0.0.1 (trainer.num_nodes=2, one process each) and one process with the
    same global batch, each in a copy of its own; what they wrote and what they printed."""
    tmp = tmp_path_factory.mktemp("ddp-nodes")
    nodes = [machine(tmp / f"node{rank}", even_digits, [*SMALL, *TWO_NODES]) for rank in (0, 1)]
    single = machine(tmp / "single", even_digits, [*SMALL, *ONE_PROCESS])
    before = files(nodes[1])
    port = str(free_port())
    launch = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
    processes = [
        subprocess.Popen(
            stage_command(),
            cwd=node,
            env=stage_env(node, tmp / "mlflow.db", NODE_RANK=str(rank), **launch),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, node in enumerate(nodes)
    ]
    outputs = [process.communicate(timeout=400) for process in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, out + err[-3000:]
    done = subprocess.run(
        stage_command(),
        cwd=single,
        env=stage_env(single, tmp / "single.db"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return {
        "nodes": nodes,
        "single": single,
        "stdout": [out for out, _ in outputs],
        "node1_before": before,
        "store": tmp / "mlflow.db",
    }


def checkpoint(root: Path) -> dict:
    import torch

    return torch.load(root / "models/model.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.e2e
@pytest.mark.slow
def test_two_nodes_train_the_weights_one_process_trains_with_the_same_global_batch(two_nodes, even_digits):
    from imgclf.data.normalized import load_split

    ddp, one = checkpoint(two_nodes["nodes"][0]), checkpoint(two_nodes["single"])
    n_train = len(load_split(even_digits[1], "train")[1])
    steps = EPOCHS * -(-n_train // 128)  # 1256 images: 10 steps of 128 (64 per node) an epoch
    assert ddp["global_step"] == one["global_step"] == steps
    assert ddp["state_dict"].keys() == one["state_dict"].keys()
    diff = max(float((ddp["state_dict"][k] - one["state_dict"][k]).abs().max()) for k in one["state_dict"])
    assert diff < 1e-6
    layout = "DDP: 2 processes (1 per node x 2 nodes), batches of 64 per process, 128 per step"
    assert layout in two_nodes["stdout"][0]


@pytest.mark.e2e
@pytest.mark.slow
def test_only_the_first_node_tracks_and_writes(two_nodes):
    import json

    node0, node1 = two_nodes["nodes"]
    (run,) = mlflow_runs(two_nodes["store"])  # one run for the whole job
    assert run.info.status == "FINISHED" and run.data.params["trainer.num_nodes"] == "2"
    assert run.data.metrics["processes"] == 2 and run.data.tags["data.normalized_sha256"]
    assert json.loads((node0 / "metrics/train.json").read_text())["processes"] == 2
    for output in OUTPUTS:
        assert (node0 / output).is_file()
    assert files(node1) == two_nodes["node1_before"]  # not a file written, created or touched
    assert two_nodes["stdout"][1] == ""  # its lines are the first node's to print


@pytest.mark.e2e
@pytest.mark.slow
def test_trainer_ddp_with_two_devices_starts_two_processes(even_digits, tmp_path):
    from imgclf.data.normalized import load_split

    root = machine(tmp_path / "repo", even_digits, [*SMALL, "trainer=ddp", "trainer.devices=2"])
    done = subprocess.run(
        stage_command(),
        cwd=root,
        env=stage_env(root, tmp_path / "mlflow.db"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "DDP: 2 processes (2 per node x 1 nodes)" in done.stdout
    # Each optimizer step takes 64 images in each of two processes: half the steps of one process.
    n_train = len(load_split(even_digits[1], "train")[1])
    assert checkpoint(root)["global_step"] == EPOCHS * -(-(n_train // 2) // 64)
    assert len(mlflow_runs(tmp_path / "mlflow.db")) == 1


MISMATCH = "but trainer.devices x trainer.num_nodes = 1 x 1 = 1"


@pytest.mark.e2e
@pytest.mark.slow
def test_a_node_whose_world_size_differs_from_the_config_stops_in_one_line(even_digits, tmp_path):
    """The environment says 2 nodes x 1 process, the config 1 node (num_nodes left at 1). The
    other checks of the launch (NODE_RANK, torchrun's LOCAL_WORLD_SIZE) are unit-tested."""
    root = machine(tmp_path / "repo", even_digits, [*SMALL, "trainer=ddp", "trainer.devices=1"])
    launch = {
        "WORLD_SIZE": "2",
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    done = subprocess.run(
        stage_command(),
        cwd=root,
        env=stage_env(root, tmp_path / "mlflow.db", **launch),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    (error,) = done.stderr.strip().splitlines()
    assert error.startswith(
        f"imgclf: error: WORLD_SIZE=2 in the environment, {MISMATCH}: set trainer.num_nodes"
    )
    assert not (root / "models").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_torchrun_with_a_one_process_config_trains_nothing(even_digits, tmp_path):
    """torchrun's two processes against trainer=cpu: once two complete trainings, both rank 0."""
    root = machine(tmp_path / "repo", even_digits, SMALL)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", *stage_command()[1:]],
        cwd=root,
        env=stage_env(root, tmp_path / "mlflow.db", MASTER_PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert f"imgclf: error: WORLD_SIZE=2 in the environment, {MISMATCH}" in done.stderr
    assert re.search(r"exitcode\s*:\s*2\b", done.stderr)  # torchrun's report of the worker that stopped
    assert not (root / "models").exists() and not (tmp_path / "mlflow.db").exists()
