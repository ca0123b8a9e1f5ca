"""A process that imports the stages' libraries once and forks one child per stage run (a zygote).

On this project's 2-core test machine a stage process spends ~10 s of CPU importing torch, Dynamo,
DeepSpeed, diffusers, peft and transformers before it does anything, about as much as a tiny stage's
work; `make test` starts over a hundred. conftest.run_stage sends each `python -m workflow.<stage>
ARGS` here instead: the child of this process runs the module as `python -m` would (`runpy`, the
same argv, working directory and environment, its output in the caller's files, an uncaught
exception printing its traceback and exiting 1), with the libraries already in memory.

What a fresh interpreter would show and this does not: an import that fails only at start-up. The
documented-command, end-to-end, fault and Slurm tests start every stage as the rules do (Snakemake,
fresh processes), so that is still tested.

Protocol (stdin/stdout, one JSON line each): the request {"argv", "cwd", "env", "stdout", "stderr"}
-> {"pid": N} when the child started -> {"returncode": R} when it ended (negative: the signal).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import threading

# What the stages import from other packages (workflow's own modules are left to the child: run
# as __main__, a preloaded stage module would exist twice); what is missing here the child imports
PRELOAD = {
    "torch": [], "torch._dynamo": [], "numpy": [], "PIL.Image": [], "safetensors.torch": [], "webdataset": [],
    "deepspeed": [], "deepspeed.runtime.zero.stage_1_and_2": [], "deepspeed.utils.zero_to_fp32": [],
    "peft": ["LoraConfig"], "transformers": ["CLIPTokenizer", "CLIPTextModel", "CLIPTextModelWithProjection"],
    "diffusers": ["AutoencoderKL", "UNet2DConditionModel", "DDPMScheduler", "DDIMScheduler", "StableDiffusionPipeline",
                  "StableDiffusionXLPipeline"],
    "sklearn.datasets": [], "sklearn.svm": [], "sklearn.model_selection": [],
}


def preload() -> None:
    import importlib

    for module, names in PRELOAD.items():
        imported = importlib.import_module(module)
        for name in names:  # diffusers and transformers import a class's module when it is first asked for
            getattr(imported, name)
    # forking a process with other threads can leave their locks held in the child
    assert threading.active_count() == 1, f"threads after the imports: {threading.enumerate()}"


REPLIES = os.dup(1)  # the caller's pipe; fd 1 becomes stderr, for what the imports print
os.dup2(2, 1)


def reply(message: dict) -> None:
    os.write(REPLIES, (json.dumps(message) + "\n").encode())


def serve() -> dict:
    """Answers requests until stdin closes; returns, in the child only, the request it is to run."""
    requests = os.fdopen(0, "rb", buffering=0)  # unbuffered: no request read ahead into a child's stdin
    for line in iter(requests.readline, b""):
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return request
        reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        reply({"returncode": os.waitstatus_to_exitcode(status)})
    sys.exit(0)


def become(request: dict) -> None:
    """This child turns into `python -m <module> ARGS` started in `cwd` with `env`."""
    os.setsid()  # its own process group: a timeout kills it and the ranks it forked
    os.close(REPLIES)
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_TRUNC)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    flag, module, *args = request["argv"]
    assert flag == "-m", request["argv"]
    sys.path[0] = request["cwd"]  # what `python -m` puts first
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    sys.path[0] = os.getcwd()  # the repo root, as for the children; not tests/
    preload()
    become(serve())
