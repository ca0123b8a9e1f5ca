"""train.profile_at: where a training step's time goes, from torch.profiler on rank 0.

Writes <run>/profile/summary.json (wall time vs GPU-busy time per step: a GPU that waits on the
host shows as busy < wall, and its idle time by the host phase it waited for; how long the host
waited for the GPU, and on a GPU at which Python lines) and ops.txt (the ops with the most GPU and host time).
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from .fsutil import write_json

PROFILED_STEPS = 3
PHASE_PREFIX = "train/"  # the train loop's record_function names: where the host is in a step
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")
REPO = Path(__file__).resolve().parents[1]
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")  # Triton: cuLaunch*


def phase(name: str):
    """Marks a part of a training step in the profile (a no-op when not profiling)."""
    return torch.profiler.record_function(PHASE_PREFIX + name)


def gpu_busy_spans(events) -> list[tuple[float, float]]:
    """The intervals in which at least one kernel or copy ran on the GPU, merged. Device-side
    spans of annotations (ProfilerStep#, record_function) are not GPU work and are left out."""
    merged: list[list[float]] = []
    for start, stop in sorted((e.time_range.start, e.time_range.end) for e in events
                              if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]


def busy_us(spans: list[tuple[float, float]]) -> float:
    """Time at least one kernel or copy ran (two streams at once count once)."""
    return sum(b - a for a, b in spans)


def gpu_idle_by_phase(events, busy: list[tuple[float, float]], steps: int) -> dict[str, float]:
    """GPU idle time (ms per step) between its first and last work, by the host phase (a
    `train/...` record_function) that was running when the GPU got work again: the phase the GPU
    waited for; `busy` = gpu_busy_spans(events). A GPU that is never idle has no entries."""
    phases = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                    if e.device_type == DeviceType.CPU and e.name.startswith(PHASE_PREFIX))
    idle: Counter = Counter()
    for (_, gap_start), (gap_end, _) in zip(busy, busy[1:]):
        # The innermost (latest-started) phase running at the gap's end.
        running = [name for start, stop, name in phases if start <= gap_end <= stop]
        idle[running[-1].removeprefix(PHASE_PREFIX) if running else "(outside the phases)"] += gap_end - gap_start
    return {k: round(v / 1e3 / steps, 2) for k, v in idle.most_common()}


def host_waits(events, steps: int) -> list[dict]:
    """Host time spent waiting for the device, per kind of wait (a read of a device value such as
    `.item()` or `bool(tensor)` counts once, not again for the synchronization inside it)."""
    calls: Counter = Counter()
    wait_us: Counter = Counter()
    for e in events:
        if e.name in HOST_WAITS and not _has_ancestor(e, HOST_WAITS):
            calls[e.name] += 1
            wait_us[e.name] += e.cpu_time_total
    return [{"wait": name, "calls_per_step": round(calls[name] / steps, 2),
             "ms_per_step": round(wait_us[name] / 1e3 / steps, 2)} for name in sorted(calls, key=lambda k: -wait_us[k])]


def _has_ancestor(event, names) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in names:
            return True
        parent = parent.cpu_parent
    return False


class SyncSites:
    """The Python lines where the host waits for the GPU (`.item()`, `bool(tensor)`, a copy to the
    host, synchronize()): torch's CUDA sync debug mode warns at each, and the warning's stack is
    kept. After such a wait the GPU runs only as fast as the host launches the next work."""

    MESSAGE = "called a synchronizing CUDA operation"

    def __init__(self):
        self.sites: Counter = Counter()
        self._catch = None

    def start(self) -> None:
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.filterwarnings("always", message=f".*{self.MESSAGE}")
        shown = warnings.showwarning

        def record(message, *args, **kwargs):
            if self.MESSAGE not in str(message):
                return shown(message, *args, **kwargs)
            self.sites[_calling_lines(traceback.extract_stack()[:-1])] += 1

        warnings.showwarning = record
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if self._catch is not None:
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(None, None, None)
            self._catch = None

    def summary(self, steps: int) -> list[dict]:
        return [{"at": at, "calls_per_step": round(n / steps, 2)} for at, n in self.sites.most_common()]


def _calling_lines(stack: traceback.StackSummary, depth: int = 4) -> str:
    """The innermost `depth` frames outside torch and the warnings module, innermost first."""
    frames = [f for f in stack if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")]
    return " <- ".join(f"{_short_path(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-depth:]))


def _short_path(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/")[-1]
    return str(Path(path).relative_to(REPO)) if Path(path).is_relative_to(REPO) else path


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
        self.calls, self.first_active = 0, profile_at - start_step  # step() calls before the first profiled step
        self.syncs = SyncSites()
        self.prof.start()

    def step(self) -> None:
        if self.prof is None:
            return
        self.calls += 1
        if self.calls == self.first_active:
            self.syncs.start()
        elif self.calls == self.first_active + PROFILED_STEPS:
            self.syncs.stop()  # before the profiler's step writes the summary
        self.prof.step()

    def close(self) -> None:
        if self.prof is not None:
            self.syncs.stop()
            self.prof.stop()
            self.prof = None

    def _write(self, prof) -> None:
        events = prof.key_averages()
        steps = [e for e in events if e.key.startswith("ProfilerStep")]
        wall_us = sum(e.cpu_time_total for e in steps)
        raw = prof.events()  # each event, for what per-name averages lose: intervals, parents
        busy = gpu_busy_spans(raw)  # sorted once, for busy and idle time
        ops = [e for e in events if not e.key.startswith("ProfilerStep")]
        top = lambda attr: [{"op": e.key, "ms_per_step": round(getattr(e, attr) / 1e3 / PROFILED_STEPS, 2),
                             "calls_per_step": e.count // PROFILED_STEPS}
                            for e in sorted(ops, key=lambda e: -getattr(e, attr))[:25]]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.out_dir / "summary.json", {
            "steps": PROFILED_STEPS, "wall_ms_per_step": round(wall_us / 1e3 / PROFILED_STEPS, 2),
            "gpu_busy_ms_per_step": round(busy_us(busy) / 1e3 / PROFILED_STEPS, 2),
            "gpu_idle_ms_per_step_by_host_phase": gpu_idle_by_phase(raw, busy, PROFILED_STEPS),
            # Host cost scales with these: each op is a dispatch, each launch a driver call.
            "aten_ops_per_step": sum(e.count for e in events if e.key.startswith("aten::")) // PROFILED_STEPS,
            "kernel_launches_per_step": sum(e.count for e in events if e.key in KERNEL_LAUNCHES) // PROFILED_STEPS,
            "top_gpu": top("self_device_time_total"), "top_host": top("self_cpu_time_total"),
            "host_waits": host_waits(raw, PROFILED_STEPS),
            "sync_sites": self.syncs.summary(PROFILED_STEPS)})
        (self.out_dir / "ops.txt").write_text(events.table(sort_by="self_device_time_total", row_limit=40) + "\n"
                                              + events.table(sort_by="self_cpu_time_total", row_limit=40))
