"""Patches of DeepSpeed's engine, checked against the pinned version: less host work in its optimizer
step, so the host stays ahead of the GPU; and the fp16 loss scale that ZeRO-0 leaves out.

ZeRO-1/2: the step without its two reads of GPU values back to the host.

Profiled on an H200 (BENCHMARKS.md), each ZeRO-2 step waited twice for the GPU to finish all queued
work: once to replace a non-finite gradient norm by -1 (`masked_fill_` with a tensor fill value
reads that value back) and once to decide whether that -1 should turn clipping off (`bool()` of a
device tensor). After each wait the GPU sat idle until the host had queued the optimizer, the
weight copies and the next forward again: 85 ms of a 553 ms step. The same arithmetic can stay on
the GPU, so the step here queues it without waiting. The results are those of DeepSpeed's own code,
value for value (tests/test_train.py compares both on the same inputs).

ZeRO-0 with fp32 weights (precision fp32, bf16-mixed): DeepSpeed clips with a norm and a multiply
per parameter (two launches each, 686 parameters in SD 1.5's UNet); torch's clip_grad_norm_ does
the same arithmetic in a few foreach launches. On one rank DeepSpeed also flattens, "all-reduces"
and copies back every gradient; a single rank has nothing to reduce.

ZeRO-0 in fp16: DeepSpeed 0.19.8's engine.backward multiplies the loss by the loss scale only for
ZeRO 1-3, while its fp16 optimizer (FP16_UnfusedOptimizer) divides the gradients by that scale
before the step all the same (deepspeedai/DeepSpeed#8393, open). Every gradient reached AdamW 2^16
times too small, where its epsilon swamps it: on one H200 the default digits run in fp16 moved its
weights a fifth as far as fp32 and drew noise (README, fp16). `scale_zero0_fp16_loss` scales the
loss as the optimizer's own backward would, and unscales the gradient norm that optimizer reports
(it reports the scaled one, where ZeRO 1-3 report the true norm).

Only for the pinned DeepSpeed version (pyproject.toml), whose code this was checked against; with
another version the step is left as DeepSpeed has it.
"""

from __future__ import annotations

import types
import warnings

import torch

CHECKED_VERSION = "0.19.8"


def mask_non_finite(norm: torch.Tensor, device=None, val: float = -1.0) -> None:
    """DeepSpeed's `mask_nan_or_inf_with_val_inplace` (inf/NaN -> -1) with a Python fill value,
    which needs no read of the GPU."""
    norm.masked_fill_(~torch.isfinite(norm), -1.0)  # DeepSpeed's version ignores `val` too


def unscale_and_clip_on_device(self, grad_groups_flat, total_norm) -> None:
    """DeepSpeedZeroOptimizer.unscale_and_clip_grads with the invalid-norm case (inf, NaN or the -1
    sentinel: no clipping) chosen on the GPU instead of by `bool()` on the host."""
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        norm = torch.as_tensor(total_norm, dtype=torch.float, device=self.device)
        clip_norm = norm.masked_fill(~torch.isfinite(norm) | (norm < 0), float("inf"))
        clip = ((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad
        combined_scale = torch.clamp(clip, min=1.0) * self.loss_scale
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1.0 / combined_scale)


def remove_step_syncs(optimizer) -> bool:
    """Patch a ZeRO-1/2 optimizer (not CPU-offloaded: that path computes its norm elsewhere) in
    place; True when patched."""
    import deepspeed
    from deepspeed.runtime.zero import stage_1_and_2

    if not isinstance(optimizer, stage_1_and_2.DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return False
    if deepspeed.__version__ != CHECKED_VERSION:
        warnings.warn(f"DeepSpeed {deepspeed.__version__} is not the checked {CHECKED_VERSION}: its ZeRO step keeps "
                      f"its host syncs (slower on GPUs, results unchanged)")
        return False
    stage_1_and_2.mask_nan_or_inf_with_val_inplace = mask_non_finite  # the name get_grad_norm_direct calls
    optimizer.unscale_and_clip_grads = types.MethodType(unscale_and_clip_on_device, optimizer)
    return True


def clip_fp32_gradients_foreach(self) -> None:
    """DeepSpeedEngine.clip_fp32_gradients (ZeRO-0, fp32 weights): the gradients are already the
    same on every rank, so the local norm is the global one."""
    params = [p for p in self.module.parameters() if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, self.gradient_clipping(), foreach=True)


def lighten_zero0_step(engine, world_size: int) -> bool:
    """Patch a ZeRO-0 engine with fp32 weights in place (torch's optimizer steps them directly);
    True when patched."""
    import deepspeed

    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled() or engine.mpu is not None:
        return False
    if deepspeed.__version__ != CHECKED_VERSION:
        return False
    engine.clip_fp32_gradients = types.MethodType(clip_fp32_gradients_foreach, engine)
    if world_size == 1:
        engine.enable_backward_allreduce = False
    return True


def scale_zero0_fp16_loss(engine) -> bool:
    """Patch a ZeRO-0 fp16 engine's backward to scale the loss by the optimizer's current loss scale,
    which its step divides out again (see the module docstring); True when patched."""
    import deepspeed

    if engine.zero_optimization() or not engine.fp16_enabled():
        return False
    if deepspeed.__version__ != CHECKED_VERSION:
        warnings.warn(f"DeepSpeed {deepspeed.__version__} is not the checked {CHECKED_VERSION}: ZeRO-0 fp16's loss is "
                      f"left as its engine scales it (0.19.8 did not: check deepspeedai/DeepSpeed#8393)")
        return False

    scaled_by = [1.0]  # the scale of the last backward: the step may change the optimizer's after it

    def backward(loss, retain_graph=False, scale_wrt_gas=True):
        scaled_by[0] = scale = engine.optimizer.loss_scale
        return unscaled_backward(loss * scale, retain_graph=retain_graph, scale_wrt_gas=scale_wrt_gas) / scale

    def get_global_grad_norm():
        norm = scaled_grad_norm()
        return None if norm is None else norm / scaled_by[0]

    unscaled_backward, scaled_grad_norm = engine.backward, engine.get_global_grad_norm
    engine.backward, engine.get_global_grad_norm = backward, get_global_grad_norm
    return True
