"""Does the compiled UNet train the same weights as the eager one? One forward and backward of the
same random UNet on the same inputs, eager and through torch.compile as train.compile does it
(workflow.engine.compile_forward), and every trainable weight's gradient compared. Prints JSON;
exits 1 when a weight's gradient is zero only in the compiled run or differs by more than
--tolerance (relative, per weight).

    python bench/compile_grads.py                                                   # builtin:sd15-arch, bf16, on the GPU
    python bench/compile_grads.py --lora-rank 32 --checkpointing down_blocks.0,up_blocks.3   # lora-8gb.yaml's step
    python bench/compile_grads.py --model results/<run>/model --device cpu --dtype fp32     # a local diffusers folder

Why: torch 2.13's CPU Inductor gives the weights whose gradient flows back through the first up
block's upsampler zero gradients (84 of 208 on a small UNet); the aot_eager backend, which runs the
same decompositions and partitioner without Inductor's code generation, gets them right
(--backend aot_eager). A compiled run would leave those weights untrained without a word. On a CUDA
GPU (torch 2.11, H100) the gradients agree (BENCHMARKS.md "Compiled under 12 and 24 GiB"); the train
stage refuses train.compile on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from activations import random_unet, unet_inputs, vae_factor  # noqa: E402

from workflow.engine import compile_forward  # noqa: E402
from workflow.models import set_gradient_checkpointing, top_block  # noqa: E402


def gradients(unet, inputs: dict, backend: str | None) -> dict[str, torch.Tensor]:
    """Each trainable weight's gradient after one backward of the mean squared prediction."""
    torch._dynamo.reset()
    if backend == "inductor":
        compile_forward(unet)
    elif backend:
        unet.forward = torch.compile(unet.forward, backend=backend)
    unet(**inputs).sample.float().square().mean().backward()
    return {name: p.grad.float().clone() for name, p in unet.named_parameters() if p.requires_grad}


def compare(eager: dict, compiled: dict) -> dict:
    zero = [n for n in eager if compiled[n].norm() == 0 and eager[n].norm() > 0]
    rel = {n: ((compiled[n] - eager[n]).norm() / eager[n].norm().clamp_min(1e-12)).item() for n in eager}
    worst = max(rel, key=rel.get)
    return {"weights": len(eager), "zero_only_compiled": len(zero),
            "zero_only_compiled_blocks": sorted({top_block(n) for n in zero}), "zero_only_compiled_first": zero[:5],
            "max_rel_diff": round(rel[worst], 5), "max_rel_diff_weight": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:sd15-arch", help="builtin:sd15-arch | builtin:sdxl-arch | a "
                    "diffusers folder (its unet/config.json; random weights of that shape)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=None, help="LoRA adapters of this rank; only they are compared")
    ap.add_argument("--checkpointing", default="", help="blocks to checkpoint, comma-separated (train.gradient_checkpointing)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend: inductor (as train.compile), "
                    "aot_eager, eager")
    ap.add_argument("--tolerance", type=float, default=None, help="largest relative gradient difference accepted "
                    "(default: 0.1 for bf16, 0.01 for fp32)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    tolerance = args.tolerance if args.tolerance is not None else {"bf16": 0.1, "fp32": 0.01}[args.dtype]
    started = time.time()
    torch.manual_seed(args.seed)
    base = random_unet(args.model, dtype, device=args.device, lora_rank=args.lora_rank)
    if args.lora_rank:  # peft starts lora_B at zero, which leaves lora_A without a gradient to compare
        with torch.no_grad():
            for name, p in base.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
    if args.checkpointing:
        set_gradient_checkpointing(base, args.checkpointing.split(","))
    vae = vae_factor(args.model)
    resolution = args.resolution or base.config.sample_size * vae
    inputs = unet_inputs(base.config, args.micro_batch, resolution, vae, dtype, device=args.device)
    eager = gradients(copy.deepcopy(base), inputs, None)
    compiled = gradients(copy.deepcopy(base), inputs, args.backend)
    result = {"bench": "compile_grads", "model": args.model, "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "backend": args.backend, "dtype": args.dtype, "resolution": resolution,
              "micro_batch": args.micro_batch, "lora_rank": args.lora_rank, "checkpointing": args.checkpointing or None,
              **compare(eager, compiled), "tolerance": tolerance}
    result["ok"] = result["zero_only_compiled"] == 0 and result["max_rel_diff"] <= tolerance
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
