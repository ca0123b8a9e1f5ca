"""Process launch and rank geometry.

A stage that runs on several ranks (train) is started once by its rule. If no launcher set RANK,
it starts itself again as one process per GPU (or forks `train.procs` processes on a machine without
GPUs, using gloo), torchrun-style on this host, and waits for them. Under another launcher (srun), the
geometry comes from its RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    control: Any = None  # a gloo group for host-side decisions, so they never wait on the GPU stream

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank."""
        if self.size == 1:
            return flag
        t = torch.tensor([int(flag)])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank (host-side objects, over the control group)."""
        if self.size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(gathered, obj, group=self.control)
        return gathered


def procs_wanted(cpu_procs: int) -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else cpu_procs


def launched() -> bool:
    """True in a rank: one this module started, or an srun task (see slurm_geometry)."""
    if os.environ.get("DSD_RANKS_FROM") == "slurm" and "RANK" not in os.environ:
        os.environ.update(slurm_geometry())
        print(f"train: rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} is srun task "
              f"{os.environ['SLURM_PROCID']} of job {os.environ['SLURM_JOB_ID']} on {socket.gethostname()}",
              file=sys.stderr, flush=True)
    return "RANK" in os.environ


def slurm_geometry() -> dict[str, str]:
    """RANK & co. of an srun task (one per GPU): from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS; the
    rendezvous at the first host of the step's node list, on a port derived from the job id (so
    every task computes the same one, and a retried job the same again)."""
    env = os.environ
    missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_ID") if k not in env]
    if missing:
        raise RuntimeError(f"DSD_RANKS_FROM=slurm outside an srun task: {', '.join(missing)} not set")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                           check=True).stdout.split()
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    geometry = {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env["SLURM_LOCALID"], "WORLD_SIZE": env["SLURM_NTASKS"],
                "MASTER_ADDR": hosts[0], "MASTER_PORT": str(20000 + int(env["SLURM_JOB_ID"]) % 20000),
                "DSD_RANK_HOSTS": ",".join(rank_hosts(hosts, per_node))}
    if "SLURM_CPUS_PER_TASK" in env:  # a task's own cores, not the job's (Snakemake sets the latter)
        geometry["OMP_NUM_THREADS"] = env["SLURM_CPUS_PER_TASK"]
    return geometry


def rank_hosts(hosts: list[str], tasks_per_node: str) -> list[str]:
    """The host of each rank under srun's default (block) distribution: SLURM_STEP_TASKS_PER_NODE
    reads e.g. "2(x3),1" (2 tasks on each of 3 nodes, then 1)."""
    counts: list[int] = []
    for part in filter(None, tasks_per_node.split(",")):
        n, _, times = part.partition("(x")
        counts += [int(n)] * (int(times.rstrip(")")) if times else 1)
    return [host for host, n in zip(hosts, counts) for _ in range(n)]


class RanksMissing(RuntimeError):
    """Not every rank reached the rendezvous in time (a node that failed to start or cannot be reached)."""


def rendezvous(rank: int, size: int, timeout_s: float):
    """The store the process group starts from: rank 0 serves it at MASTER_ADDR:MASTER_PORT, every
    rank signs in with its host, and rank 0 waits at most `timeout_s` for all of them; then, or if
    rank 0 cannot be reached, RanksMissing names the ranks (and hosts) that did not come."""
    from datetime import timedelta

    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    hosts = os.environ.get("DSD_RANK_HOSTS", "").split(",")
    where = lambda r: hosts[r] if len(hosts) == size else "?"  # noqa: E731
    try:
        store = torch.distributed.TCPStore(addr, port, size, is_master=rank == 0,
                                           timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except RuntimeError as e:  # torch's DistNetworkError / DistStoreError
        raise RanksMissing(f"rank {rank} on {socket.gethostname()} could not reach rank 0's rendezvous at "
                           f"{addr}:{port} within {timeout_s:g} s (rank 0 is expected on {where(0)}): did its node "
                           f"start? ({str(e).splitlines()[0]})") from None
    store.set(f"dsd/arrived/{rank}", socket.gethostname())
    if rank == 0:
        deadline = time.monotonic() + timeout_s
        while True:
            missing = [r for r in range(size) if not store.check([f"dsd/arrived/{r}"])]
            if not missing:
                break
            if time.monotonic() > deadline:
                listed = ", ".join(f"{r} ({where(r)})" for r in missing[:16]) + (" ..." if len(missing) > 16 else "")
                raise RanksMissing(f"{len(missing)} of {size} ranks did not arrive within {timeout_s:g} s "
                                   f"(train.rendezvous_timeout_s): rank (expected host) {listed}; check that "
                                   f"those nodes started and can reach {addr}:{port}")
            time.sleep(0.2)
    return store


# Exit code of a rank (and of the stage) that stopped on SIGTERM/SIGUSR1 after saving a checkpoint:
# "temporary failure, rerun to resume" (EX_TEMPFAIL), distinct from crashes (1) and bad input (2).
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def relaunch(module: str, argv: list[str], nprocs: int, forked_entry: Callable[[], None] | None = None) -> int:
    """Run `python -m module argv` as `nprocs` local ranks and wait for them; returns the exit code.

    On a machine without GPUs, with `forked_entry` (the module's own main, already imported here),
    the ranks are forked from this process instead: each skips its own start and imports (about
    9 s of CPU per rank for torch, DeepSpeed, diffusers and peft; the 2-rank tests on 2 cores spend
    more on that than on training). On GPUs they always start fresh: CUDA does not survive a fork.

    Stop signals reach the ranks (forwarded, in case only this process got them), which finish their
    step, save and exit with EXIT_PREEMPTED. If a rank fails, the others are given a moment to exit
    and are then killed, since they may be waiting for it in a collective."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nprocs),
               LOCAL_WORLD_SIZE=str(nprocs))
    if not torch.cuda.is_available():
        # Split the job's cores (Snakemake sets OMP_NUM_THREADS to the rule's threads) among the
        # ranks: oversubscribed OpenMP threads spin against each other and slow training ~10x.
        cores = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
        env["OMP_NUM_THREADS"] = str(max(1, cores // nprocs))
    rank_envs = [dict(env, RANK=str(r), LOCAL_RANK=str(r)) for r in range(nprocs)]
    if forked_entry is not None and not torch.cuda.is_available():
        procs = [ForkedRank(forked_entry, rank_env, f"{module.rsplit('.', 1)[-1]} rank {rank_env['RANK']}")
                 for rank_env in rank_envs]
    else:
        procs = [subprocess.Popen([sys.executable, "-m", module, *argv], env=rank_env, preexec_fn=die_with_parent)
                 for rank_env in rank_envs]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (*STOP_SIGNALS, signal.SIGINT)}
    try:
        return _wait_all(procs)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()


class ForkedRank:
    """A rank forked from the launcher, with the part of subprocess.Popen's interface _wait_all uses.
    The child takes `env` as its whole environment, dies with the launcher like a started rank, and
    never returns into the launcher's code: `entry` ends it with the stage's exit code. Its command
    line is the launcher's and /proc/<pid>/environ keeps the launcher's environment (the kernel's
    copy), so the process is named `name` (`ps -o comm`, top: "train rank 1")."""

    def __init__(self, entry: Callable[[], None], env: dict[str, str], name: str):
        sys.stdout.flush()
        sys.stderr.flush()
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.environ.clear()
                os.environ.update(env)
                die_with_parent()
                set_process_name(name)
                entry()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - a child must never unwind into the launcher
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N for signal N, as Popen
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _wait_all(procs: list, grace_s: float = 15.0) -> int:
    """Wait for every rank. The first rank to fail on its own gives the exit code; the others get
    `grace_s` to follow and are then killed (they may wait for it in a collective)."""
    first_failure = None
    failed_at = None
    while any(p.poll() is None for p in procs):
        if first_failure is None:
            first_failure = next((p.returncode for p in procs if p.returncode not in (None, 0, EXIT_PREEMPTED)), None)
            failed_at = time.monotonic() if first_failure is not None else None
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            break
        time.sleep(0.2)
    codes = [p.poll() for p in procs]
    if first_failure is None:
        first_failure = next((c for c in codes if c not in (0, EXIT_PREEMPTED)), None)
    if first_failure is not None:
        return first_failure if first_failure > 0 else 1
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0


def die_with_parent() -> None:
    """Linux: a rank gets SIGKILL when the launcher dies, so no orphan holds the GPU or the port."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def set_process_name(name: str) -> None:
    """Linux: the name ps, top and /proc/<pid>/comm show (15 bytes at most)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except OSError:
        pass


def stop_when_parent_dies(poll_s: float = 0.5) -> None:
    """SIGTERM to this process once the process that started it is gone (its parent id changes).

    The train rule `exec`s the stage, so its parent is Snakemake: if Snakemake is killed outright
    (kill -9, a lost login shell), training saves a checkpoint and exits 75 like on a time limit,
    instead of running on unseen while the user reruns Snakemake on the same run folder."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"the process that started this stage (pid {parent}) is gone: stopping after a checkpoint",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class StopRequest:
    """Set by SIGTERM/SIGUSR1 (Slurm's warning before a time limit or preemption); the training loop
    checks it once per optimizer step, on every rank, and stops after saving a checkpoint."""

    def __init__(self):
        self.signal: int | None = None
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signum


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world(rendezvous_timeout_s: float = 300) -> World:
    """Initialise torch.distributed (gloo on CPU, NCCL on GPU) for this rank from our rendezvous
    (which names the ranks that never arrive), then DeepSpeed's communication on top of it."""
    import deepspeed

    from .build_ops import use_environment_ninja

    use_environment_ninja()  # DeepSpeed may JIT-load its ops from here on (the shm op, CPU Adam)
    if "RANK" not in os.environ:  # a single process that no launcher started
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    rank, local_rank, size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    store = rendezvous(rank, size, rendezvous_timeout_s)
    # As DeepSpeed would: the rank's GPU bound where there are several ranks (NCCL setup at init)
    bound = {"device_id": torch.device("cuda", local_rank)} if torch.cuda.is_available() and size > 1 else {}
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=size, **bound)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    control = torch.distributed.new_group(backend="gloo") if torch.cuda.is_available() and size > 1 else None
    world = World(rank, local_rank, size, control)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return world


def device_for(world: World) -> torch.device:
    return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
