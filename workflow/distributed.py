"""Process launch and rank geometry.

A stage that runs on several ranks (train) is started once by its rule. If no launcher set RANK,
it re-executes itself under `torch.distributed.run --standalone` with one process per GPU (or
`train.procs` processes on a machine without GPUs, using gloo). Under another launcher, the geometry
comes from its RANK / LOCAL_RANK / WORLD_SIZE.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def procs_wanted(cpu_procs: int) -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else cpu_procs


def launched() -> bool:
    return "RANK" in os.environ


def relaunch(module: str, argv: list[str], nprocs: int) -> int:
    """Run `python -m module argv` as `nprocs` ranks; returns the launcher's exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}",
           "-m", module, *argv]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # Split the job's cores (Snakemake sets OMP_NUM_THREADS to the rule's threads) among the
        # ranks: oversubscribed OpenMP threads spin against each other and slow training ~10x.
        cores = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
        env["OMP_NUM_THREADS"] = str(max(1, cores // nprocs))
    return subprocess.call(cmd, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world() -> World:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU) for this rank."""
    import deepspeed

    if "RANK" not in os.environ:  # a single process that no launcher started
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    world = World(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", auto_mpi_discovery=False)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return world


def device_for(world: World) -> torch.device:
    return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
