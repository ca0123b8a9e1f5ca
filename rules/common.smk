# Config loading/validation and the paths every rule shares. All logic lives in workflow/.
import json
import os
import sys
from pathlib import Path

from workflow.config import TINY_BUILTINS, ConfigError, stage_config, validate

try:
    # `config` = config.yaml (or --configfile) + --config key=value overrides (dotted keys allowed).
    CFG = validate(config, "config (config.yaml + --config)")
except ConfigError as e:
    raise WorkflowError(str(e)) from None

PY = sys.executable  # the interpreter running snakemake (the project's venv) runs every stage
DATA = f"results/data/{CFG.dataset_name}"
MODEL = f"resources/models/{CFG.model_name}"
LATENTS = f"results/latents/{CFG.dataset_name}/{CFG.encoder_key}"
RUN = f"results/runs/{CFG.run}"
LOGS = f"logs/{CFG.run}"
BENCH = f"benchmarks/{CFG.run}"


def stage_cfg(stage):
    """The config sections a stage reads, as JSON: a change elsewhere does not rerun it."""
    return json.dumps(stage_config(CFG, stage), sort_keys=True)


def train_threads():
    """Here: one per rank `train` starts (one per visible GPU, else train.procs). On a cluster: the
    cores of one node's GPUs."""
    if os.environ.get("SLURM_JOB_ID") or workflow._cores is None:
        return SLURM.cpus_per_gpu * SLURM.gpus_per_node
    from workflow.gpus import visible_gpus

    return max(visible_gpus() or CFG.train.procs, 1)


# ---- Slurm resources (profiles/slurm); a local run ignores them
SLURM = CFG.slurm


def gpu_job(gpus, minutes):
    """What a GPU rule asks Slurm for: GPUs, cores and memory per GPU, a time limit."""
    return dict(gpu=gpus, cpus_per_gpu=SLURM.cpus_per_gpu, mem_mb=SLURM.mem_mb_per_gpu * gpus, runtime=minutes)


def train_ranks():
    return SLURM.nodes * SLURM.gpus_per_node


def train_job():
    """Several ranks: one srun task per GPU in a job step of their own (the `mpi` resource makes the
    executor leave the launch to the rule), so the time-limit signal reaches the ranks and nothing
    else. One rank: the executor's own job step."""
    res = gpu_job(SLURM.gpus_per_node, SLURM.train_minutes) | dict(nodes=SLURM.nodes)
    if train_ranks() > 1:
        del res["gpu"]
        res |= dict(gres=f"gpu:{SLURM.gpus_per_node}", mpi="srun", tasks_per_node=SLURM.gpus_per_node)
    if SLURM.signal_seconds:
        res["slurm_extra"] = f"--signal=USR1@{SLURM.signal_seconds}"
    return res


def job_cores():
    """A job's threads: every core here; on a cluster (also inside its jobs, where --cores means the
    node's cores) the cores of one GPU's share, so a job never asks for more than it was given."""
    if os.environ.get("SLURM_JOB_ID"):  # inside a cluster job, --cores is the whole node's
        return SLURM.cpus_per_gpu
    try:
        return workflow.cores
    except WorkflowError:  # submitting to a cluster: no --cores
        return SLURM.cpus_per_gpu
