"""GPU memory settings of a stage process: a cap that makes a bigger GPU run out of memory where a
smaller card would (train.memory_cap_gb; the card recipes are measured that way), the allocator's
expandable segments, and the peaks a stage reports."""

from __future__ import annotations

import torch

from .config import TrainConfig


def check_memory_cap(cap_gb: float | None) -> None:
    """A cap that cannot apply is an error, not a run on the whole card (or on the CPU) that looks capped."""
    if cap_gb is None:
        return
    if not torch.cuda.is_available():
        raise ValueError(f"train.memory_cap_gb {cap_gb} needs a GPU (this machine has none); leave it null here")
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if cap_gb > total:
        raise ValueError(f"train.memory_cap_gb {cap_gb} is more than this GPU's {total:.1f} GiB "
                         f"({torch.cuda.get_device_name(0)})")


def set_up_gpu_memory(device: torch.device, t: TrainConfig) -> None:
    """train.expandable_segments and train.memory_cap_gb for this process, before its first allocation."""
    if device.type != "cuda":
        return
    if t.expandable_segments:
        use_expandable_segments()
    cap_gpu_memory(device, t.memory_cap_gb)


def use_expandable_segments() -> None:
    """PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for this process, before its first allocation.
    Through torch's runtime setter (torch 2.13 moved it to torch._C), not the variable: ranks are forked
    from a launcher that has already imported torch, where a variable set in the rank may come too late."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter("expandable_segments:True")


def cap_gpu_memory(device: torch.device, cap_gb: float | None) -> None:
    """This process may allocate at most `cap_gb` GiB on `device`: past it the caching allocator raises
    out-of-memory as the smaller card would (what it counts is reserved memory, as on that card)."""
    if cap_gb is None:
        return
    index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" names no card
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 / total), index)


def peak_gpu_memory(device: torch.device) -> tuple[int, ...]:
    """(allocated, reserved) peak bytes of this rank's GPU; () on the CPU."""
    if device.type != "cuda":
        return ()
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
