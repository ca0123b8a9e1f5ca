# Config loading/validation, `auto` settings, input checks and the paths every rule shares. All logic
# lives in workflow/ (config.py, auto.py, inputs.py, cluster.py); this file only calls it.
import json
import os
import sys
from pathlib import Path

from workflow.auto import Hardware, check_card, resolve
from workflow.cluster import check_slurm_site, submits_to_slurm
from workflow.config import TINY_BUILTINS, ConfigError, read_config_file, stage_config, validate_layers
from workflow.families import UnknownModel
from workflow.inputs import check_inputs


def config_layers():
    """config.yaml, each --configfile in the order given, then --config: what Snakemake merged into
    `config`, kept apart so that an error names the layer a bad value came from."""
    settings = workflow.config_settings
    # As Snakemake's `configfile:` does: config.yaml in the working directory, skipped when it is not
    # there and --configfile names the files instead.
    base = Path("config.yaml")
    layers = [("config.yaml", read_config_file(base))] if base.is_file() or not settings.configfiles else []
    for path in settings.configfiles or []:
        shown = os.path.relpath(path) if Path(path).is_absolute() else str(path)
        layers.append((shown, read_config_file(Path(path))))
    layers.append(("--config", dict(settings.config or {})))
    return layers


ON_SLURM = submits_to_slurm()
try:
    RAW_CFG = validate_layers(config_layers())
    SOURCE = check_inputs(RAW_CFG)  # the model, data and prior images exist and are usable
    HARDWARE = Hardware.slurm(RAW_CFG) if ON_SLURM else Hardware.this_machine(RAW_CFG)
    RESOLUTION = RAW_CFG.cache.resolution if RAW_CFG.cache.resolution != "auto" else SOURCE.resolution
    check_card(RAW_CFG, SOURCE.family, RESOLUTION, HARDWARE)
    CFG, CHOICES = resolve(RAW_CFG, HARDWARE, SOURCE.family, SOURCE.resolution)
    if ON_SLURM and workflow.is_main_process:
        check_slurm_site()  # the profile's placeholders, before anything is submitted
except (ConfigError, UnknownModel, FileNotFoundError) as e:
    raise WorkflowError(str(e)) from None

if CHOICES and workflow.is_main_process:
    print(f"auto settings ({HARDWARE.where}; workflow/auto.py):", file=sys.stderr)
    for choice in CHOICES:
        print(f"  {choice.key} = {choice.value}  ({choice.why})", file=sys.stderr)

PY = sys.executable  # the interpreter running snakemake (the project's venv) runs every stage
DATA = f"results/data/{CFG.prepared_name}"
MODEL = f"resources/models/{CFG.model_name}"
PRIOR = f"results/prior/{CFG.model_name}/{CFG.prior_dir_name}" if CFG.data.prior.generated else None
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
    if ON_SLURM or os.environ.get("SLURM_JOB_ID"):
        return SLURM.cpus_per_gpu * SLURM.gpus_per_node
    return HARDWARE.ranks


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
        res |= dict(gres=f"gpu:{SLURM.gpus_per_node}", mpi="srun")
        # The executor refuses tasks_per_node=1 for an mpi job: one GPU per node is --ntasks=nodes
        # (with --nodes, one task on each).
        res |= dict(tasks_per_node=SLURM.gpus_per_node) if SLURM.gpus_per_node > 1 else dict(tasks=train_ranks())
    if SLURM.signal_seconds:
        res["slurm_extra"] = f"--signal=USR1@{SLURM.signal_seconds}"
    return res


def job_cores():
    """A job's threads: every core here; on a cluster (also inside its jobs, where --cores means the
    node's cores) the cores of one GPU's share, so a job never asks for more than it was given."""
    if ON_SLURM or os.environ.get("SLURM_JOB_ID"):
        return SLURM.cpus_per_gpu
    try:
        return workflow.cores
    except WorkflowError:  # no --cores (a dry-run)
        return SLURM.cpus_per_gpu
