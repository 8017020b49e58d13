"""How many processes train, and whether the launch environment (torchrun, NODE_RANK) agrees."""

import os
from collections.abc import Mapping

from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

from imgclf.config.pipeline import TrainerConfig
from imgclf.errors import ConfigError


def processes_per_node(trainer: TrainerConfig) -> int:
    """trainer.devices as a number of processes on this machine.

    `auto` is Lightning's count (every GPU; one process on CPU), except on CPU with strategy ddp:
    there it is one process per CPU core this process may use, as conf/trainer/ddp.yaml promises,
    where Lightning's count would make DDP a single process. Lightning gives each of them
    cores / processes threads.
    """
    if trainer.devices != "auto":
        return trainer.devices
    if trainer.accelerator != "cpu":
        for accelerator in (MPSAccelerator, CUDAAccelerator):  # Lightning's order for `auto`
            if accelerator.is_available():
                return accelerator.auto_device_count()
        if trainer.accelerator != "auto":
            return 1  # no such device here: Lightning says so when it starts
    if trainer.strategy == "ddp":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1


def check_launch(trainer: TrainerConfig, devices: int, environ: Mapping[str, str]) -> None:
    """ConfigError if the launch environment disagrees with the config on the processes.

    A launcher (torchrun, another node's NODE_RANK, a scheduler) says how many processes take part;
    Lightning would otherwise fail deep inside, hang waiting for a node that never comes, or, with
    strategy auto, let every process train the whole model alone as rank 0.
    """

    def number(name: str) -> int | None:
        value = environ.get(name)
        if value is None:
            return None
        if not value.strip().isdigit():
            raise ConfigError(f"{name}={value!r} in the environment: expected a whole number")
        return int(value)

    world_size = devices * trainer.num_nodes
    launched = number("WORLD_SIZE")
    if launched is not None and launched != world_size:
        raise ConfigError(
            f"WORLD_SIZE={launched} in the environment, but trainer.devices x trainer.num_nodes = "
            f"{devices} x {trainer.num_nodes} = {world_size}: set trainer.num_nodes to the number of "
            "nodes and trainer.devices to the processes on each"
        )
    per_node = number("LOCAL_WORLD_SIZE")  # torchrun --nproc-per-node
    if per_node is not None and per_node != devices:
        raise ConfigError(
            f"LOCAL_WORLD_SIZE={per_node} in the environment (torchrun --nproc-per-node), "
            f"but trainer.devices={devices}: they must be equal"
        )
    for name in ("NODE_RANK", "GROUP_RANK"):  # what Lightning reads, in its order
        node_rank = number(name)
        if node_rank is not None:
            if node_rank >= trainer.num_nodes:
                raise ConfigError(
                    f"{name}={node_rank} in the environment, but trainer.num_nodes={trainer.num_nodes}: "
                    f"node ranks run from 0 to {trainer.num_nodes - 1}"
                )
            break
