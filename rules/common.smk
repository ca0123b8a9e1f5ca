# Config loading/validation and the paths every rule shares. All logic lives in workflow/.
import json
import sys
from pathlib import Path

from workflow.config import ConfigError, stage_config, validate

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


def train_procs():
    """Ranks `train` starts here: one per visible GPU, else train.procs."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else CFG.train.procs
