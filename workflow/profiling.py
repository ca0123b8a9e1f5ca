"""train.profile_at: where a training step's time goes, from torch.profiler on rank 0.

Writes <run>/profile/summary.json (wall time vs GPU-busy time per step: a GPU that waits on the
host shows as busy < wall) and ops.txt (the ops with the most GPU and host time).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from .fsutil import write_json

PROFILED_STEPS = 3


class StepProfiler:
    """Call `step()` after every optimizer step; records steps N+1..N+3 (one warm-up step before)."""

    def __init__(self, profile_at: int | None, out_dir: Path, enabled: bool, start_step: int):
        self.prof = None
        if not enabled or profile_at is None or profile_at < start_step + 1:
            return
        self.out_dir = out_dir
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=activities, on_trace_ready=self._write,
                            schedule=schedule(skip_first=profile_at - 1 - start_step, wait=0, warmup=1,
                                              active=PROFILED_STEPS, repeat=1))
        self.prof.start()

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def close(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None

    def _write(self, prof) -> None:
        events = prof.key_averages()
        steps = [e for e in events if e.key.startswith("ProfilerStep")]
        wall_us = sum(e.cpu_time_total for e in steps)
        # Kernels only: an op's device time is its kernels' time again.
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
        ops = [e for e in events if not e.key.startswith("ProfilerStep")]
        top = lambda attr: [{"op": e.key, "ms_per_step": round(getattr(e, attr) / 1e3 / PROFILED_STEPS, 2),
                             "calls_per_step": e.count // PROFILED_STEPS}
                            for e in sorted(ops, key=lambda e: -getattr(e, attr))[:25]]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.out_dir / "summary.json", {
            "steps": PROFILED_STEPS, "wall_ms_per_step": round(wall_us / 1e3 / PROFILED_STEPS, 2),
            "gpu_busy_ms_per_step": round(gpu_us / 1e3 / PROFILED_STEPS, 2),
            # Host cost scales with these: each op is a dispatch, each launch a driver call.
            "aten_ops_per_step": sum(e.count for e in events if e.key.startswith("aten::")) // PROFILED_STEPS,
            "kernel_launches_per_step": sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                              "cudaLaunchKernelExC")) // PROFILED_STEPS,
            "top_gpu": top("self_device_time_total"), "top_host": top("self_cpu_time_total")})
        (self.out_dir / "ops.txt").write_text(events.table(sort_by="self_device_time_total", row_limit=40) + "\n"
                                              + events.table(sort_by="self_cpu_time_total", row_limit=40))
