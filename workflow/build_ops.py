"""Compile the DeepSpeed C++ ops that training loads on this machine, once, at `make install`.

    python -m workflow.build_ops

DeepSpeed JIT-compiles its ops into torch's extension cache (~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR) the first time a process needs them; every later process loads the cached
library. On a machine without GPUs each rank loads the shared-memory collectives op when the process
group starts, and `train.offload_optimizer: cpu` needs CPU Adam: compiled here, the first training
(or test) does not wait for them (measured on 2 cores: 39 s and 94 s).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch


def use_environment_ninja() -> None:
    """Put this environment's bin folder (where pip installed DeepSpeed's `ninja`) first on PATH.

    torch runs whichever `ninja` is first on PATH. Two ninja versions (Debian's 1.11 in /usr/bin, pip's
    1.13 in the venv) each discard the other's build log and recompile the op from scratch, so
    processes started with and without the venv activated (`make test` vs `snakemake` from an
    activated shell) took turns recompiling CPU Adam (60-100 s each time) and the shm op."""
    bin_dir = str(Path(sys.executable).parent)
    if (Path(bin_dir) / "ninja").is_file() and os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def main() -> None:
    from deepspeed.ops.op_builder import CPUAdamBuilder, ShareMemCommBuilder

    use_environment_ninja()
    builders = [CPUAdamBuilder()] + ([] if torch.cuda.is_available() else [ShareMemCommBuilder()])
    for builder in builders:
        started = time.time()
        builder.load(verbose=False)
        print(f"{builder.absolute_name()}: ready ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
