"""The number of GPUs a process started here would see, without importing torch: the Snakefile asks
at parse time, for the train rule's threads, and importing torch there cost every `snakemake` call
(a dry run too) about 2.5 s of CPU. The ranks themselves count with torch (distributed.procs_wanted)."""

from __future__ import annotations

import os
import shutil
import subprocess


def visible_gpus() -> int:
    """The GPUs `nvidia-smi -L` lists (0 without the driver's tool), narrowed as CUDA narrows them by
    CUDA_VISIBLE_DEVICES: its entries up to the first empty or negative one."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return 0
    try:
        listing = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    gpus = sum(line.startswith("GPU ") for line in listing.splitlines())
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return gpus
    chosen = 0
    for entry in listed.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        chosen += 1
    return min(chosen, gpus)
