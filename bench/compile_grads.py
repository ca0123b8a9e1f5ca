"""Does the compiled UNet train the same weights as the eager one? One forward and backward of the
same random UNet on the same inputs, eager and through torch.compile as train.compile does it
(workflow.engine.compile_forward), and every trainable weight's gradient compared. Prints JSON;
exits 1 when a weight's gradient is zero only in the compiled run or differs by more than
--tolerance (relative, per weight). With --reference fp32, both bf16 runs are measured against an
eager fp32 run of the same weights instead, and a weight fails only where the compiled gradient is
further from it than the eager bf16 one by more than --tolerance: bf16 rounding compounded through
a deep model moves eager and compiled gradients apart without either being wrong.

    python bench/compile_grads.py                                                   # builtin:sd15-arch, bf16, on the GPU
    python bench/compile_grads.py --lora-rank 32 --checkpointing down_blocks.0,up_blocks.3   # lora-8gb.yaml's step
    python bench/compile_grads.py --model results/<run>/model --device cpu --dtype fp32     # a local diffusers folder
    python bench/compile_grads.py --model builtin:sdxl-arch --lora-rank 32 --reference fp32     # both against fp32

Why: torch 2.13's CPU Inductor gives the weights whose gradient flows back through the first up
block's upsampler zero gradients (84 of 208 on a small UNet); the aot_eager backend, which runs the
same decompositions and partitioner without Inductor's code generation, gets them right
(--backend aot_eager). A compiled run would leave those weights untrained without a word. On a CUDA
GPU (torch 2.11, H100) SD 1.5's gradients agree, LoRA and full (at most 0.052 apart); SDXL LoRA's
differ by up to 0.29 in one adapter, cause not known (BENCHMARKS.md "The 24 GiB recipe through its
config key"). The train stage refuses train.compile on a CPU.
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
from workflow.families import BUILTIN_FAMILIES, FAMILIES, Family, family_of  # noqa: E402


def gradients(unet, inputs: dict, backend: str | None) -> dict[str, torch.Tensor]:
    """Each trainable weight's gradient after one backward of the mean squared prediction."""
    torch._dynamo.reset()
    if backend == "inductor":
        compile_forward(unet)
    elif backend:
        unet.forward = torch.compile(unet.forward, backend=backend)
    unet(**inputs).sample.float().square().mean().backward()
    return {name: p.grad.float().clone() for name, p in unet.named_parameters() if p.requires_grad}


def relative_diffs(grads: dict, reference: dict) -> dict[str, float]:
    return {n: ((grads[n] - reference[n]).norm() / reference[n].norm().clamp_min(1e-12)).item() for n in reference}


def compare(eager: dict, compiled: dict, fp32: dict | None = None) -> dict:
    """The weights the compiled run left without a gradient and, per weight, how far its gradient is
    from eager's; with `fp32`, how much further from fp32's than eager's is (`max_excess`)."""
    zero = [n for n in eager if compiled[n].norm() == 0 and eager[n].norm() > 0]
    rel = relative_diffs(compiled, eager)
    worst = max(rel, key=rel.get)
    result = {"weights": len(eager), "zero_only_compiled": len(zero),
              "zero_only_compiled_blocks": sorted({Family.top_block(n) for n in zero}), "zero_only_compiled_first": zero[:5],
              "max_rel_diff": round(rel[worst], 5), "max_rel_diff_weight": worst}
    if fp32 is not None:
        eager_off, compiled_off = relative_diffs(eager, fp32), relative_diffs(compiled, fp32)
        excess = {n: compiled_off[n] - eager_off[n] for n in fp32}
        worst = max(excess, key=excess.get)
        result.update({"eager_vs_fp32_max": round(max(eager_off.values()), 5),
                       "compiled_vs_fp32_max": round(max(compiled_off.values()), 5),
                       "max_excess": round(excess[worst], 5), "max_excess_weight": worst,
                       "max_excess_weight_eager_vs_fp32": round(eager_off[worst], 5),
                       "max_rel_diff_weight_vs_fp32": {"eager": round(eager_off[result["max_rel_diff_weight"]], 5),
                                                       "compiled": round(compiled_off[result["max_rel_diff_weight"]], 5)}})
    return result


def as_fp32(inputs: dict) -> dict:
    """The same inputs with their floating-point tensors in fp32 (the timesteps stay integers)."""
    def cast(value):
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        return value.float() if value.is_floating_point() else value
    return cast(inputs)


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
    ap.add_argument("--reference", choices=("fp32",), default=None, help="fp32: judge both runs against an eager "
                    "fp32 run of the same weights (the compiled one fails where it is further off by > --tolerance)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.reference and args.dtype == "fp32":
        ap.error("--reference fp32 compares bf16 runs with fp32; pass --dtype bf16")

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
        family = FAMILIES[BUILTIN_FAMILIES[args.model]] if args.model in BUILTIN_FAMILIES else family_of(args.model)
        family.set_checkpointing(base, args.checkpointing.split(","))
    vae = vae_factor(args.model)
    resolution = args.resolution or base.config.sample_size * vae
    inputs = unet_inputs(base.config, args.micro_batch, resolution, vae, dtype, device=args.device)
    eager = gradients(copy.deepcopy(base), inputs, None)
    compiled = gradients(copy.deepcopy(base), inputs, args.backend)
    fp32 = gradients(copy.deepcopy(base).float(), as_fp32(inputs), None) if args.reference else None
    result = {"bench": "compile_grads", "model": args.model, "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "backend": args.backend, "dtype": args.dtype, "resolution": resolution,
              "micro_batch": args.micro_batch, "lora_rank": args.lora_rank, "checkpointing": args.checkpointing or None,
              "reference": args.reference, **compare(eager, compiled, fp32), "tolerance": tolerance}
    off = result["max_excess"] if fp32 is not None else result["max_rel_diff"]
    result["ok"] = result["zero_only_compiled"] == 0 and off <= tolerance
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
