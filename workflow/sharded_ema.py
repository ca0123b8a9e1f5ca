"""EMA of the trained weights during training, kept sharded like ZeRO's optimizer state (ShardedEMA,
TrainingEMAs), and reading the EMA a checkpoint saved (load_ema). Merging a checkpoint into a model
is the `ema` stage's job: workflow/ema.py.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import Config
from .fsutil import atomic_file
from .posthoc import power_beta, sigma_rel_to_gamma


class ShardedEMA:
    """An EMA of this rank's share of the fp32 master weights, updated once per optimizer step.

    The share is where the optimizer keeps its fp32 master copy: the ZeRO 1/2 (and bf16) fragment
    or the ZeRO-3 partition of each trainable parameter, so EMA memory per rank is the fp32 model
    size / ranks, like the optimizer state. Without a master copy (ZeRO-0 in fp32, where the module
    weights are the master; ZeRO-0 fp16, where DeepSpeed keeps no per-parameter view of it) each
    rank takes an even slice of the module weights. A fragment is (parameter name, flat offset,
    values); the merge stage reassembles full tensors from every rank's fragments.

    `beta(step)` is the decay applied at optimizer step `step` (1-based)."""

    def __init__(self, engine, rank: int, world_size: int, beta: Callable[[int], float], offload: bool = False):
        self.beta, self.offload = beta, offload
        self.rank, self.world_size = rank, world_size
        self.attach(engine)
        self.shadow = [src.detach().float().clone().to("cpu" if offload else src.device) for src in self.sources]

    def attach(self, engine) -> None:
        """Find this rank's master fragments (again after a checkpoint load, which may replace them)."""
        self.names, self.offsets, self.sources = [], [], []
        masters = zero0_masters(engine.optimizer)
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            offset, values = master_fragment(p, self.rank, self.world_size, masters)
            if values is not None and values.numel() > 0:
                self.names.append(name)
                self.offsets.append(offset)
                self.sources.append(values)

    @torch.no_grad()
    def update(self, step: int, values: list[torch.Tensor] | None = None) -> None:
        """Lerp toward the current masters, or toward `values`, a copy of them taken after this step."""
        if not self.shadow:
            return
        sources = [s.to(self.shadow[0].device, torch.float32) for s in (self.sources if values is None else values)]
        torch._foreach_lerp_(self.shadow, sources, 1.0 - self.beta(step))

    def state_dict(self) -> dict:
        return {"fragments": {n: (o, t.cpu()) for n, o, t in zip(self.names, self.offsets, self.shadow)},
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        frags = state["fragments"]
        if {n: o for n, (o, _) in frags.items()} != dict(zip(self.names, self.offsets)):
            raise ValueError("EMA shard in the checkpoint does not match this rank's parameters")
        for n, t in zip(self.names, self.shadow):
            t.copy_(frags[n][1])

    def load_resharded(self, states: list[dict]) -> None:
        """Load from the EMA shards of every rank of a checkpoint written by another number of ranks:
        reassembled, then cut to this rank's fragments."""
        full = gather_fragments(states)
        if set(self.names) - set(full):
            raise ValueError(f"the checkpoint's EMA lacks {sorted(set(self.names) - set(full))[:3]}")
        for n, o, t in zip(self.names, self.offsets, self.shadow):
            t.copy_(full[n][o : o + t.numel()].view_as(t))


def classic_beta(decay: float, warmup: bool) -> Callable[[int], float]:
    """The usual EMA decay; with warm-up min(decay, (1 + step) / (10 + step)) so early weights fade."""
    return (lambda step: min(decay, (1 + step) / (10 + step))) if warmup else (lambda step: decay)


class OffloadedUpdates:
    """Updates the EMAs kept in host memory beside training, not inside its step.

    An in-step update of an SD 1.5-size EMA in host memory copies 3.4 GB of fp32 masters to pageable
    memory and lerps them on the CPU while the GPU waits: the 24 GB card recipe ran 49.4 img/s so,
    54.0 with this (BENCHMARKS.md "Card-size recipes"). Here the masters are copied once per step on a side CUDA
    stream into one pinned buffer, and a worker thread lerps every EMA from it while the GPU runs the
    next micro-batches. Masters already in host memory (a CPU optimizer) are lerped from directly.
    `fence()` goes before the next optimizer step, which must not change the masters mid-copy (or,
    on the host, mid-lerp); `wait()` before anything reads an EMA. The same operations on the same
    values as the in-step update, so the EMAs are bitwise equal to it."""

    def __init__(self, sources: list[torch.Tensor]):
        self.on_gpu = bool(sources) and sources[0].is_cuda
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")
        self.pending: Future | None = None
        self.staging: list[torch.Tensor] = []
        if self.on_gpu:
            flat = torch.empty(sum(s.numel() for s in sources), dtype=torch.float32, pin_memory=True)
            starts = np.cumsum([0] + [s.numel() for s in sources])
            self.staging = [flat.narrow(0, int(a), s.numel()).view(s.shape) for a, s in zip(starts, sources)]
            self.stream, self.copied = torch.cuda.Stream(sources[0].device), torch.cuda.Event()

    @torch.no_grad()
    def submit(self, sources: list[torch.Tensor], lerp: Callable[[list[torch.Tensor]], None]) -> None:
        self.wait()  # the staging buffer (or the host masters) must be free for this step's values
        values = sources
        if self.on_gpu:
            self.stream.wait_stream(torch.cuda.current_stream())  # after the optimizer step wrote them
            with torch.cuda.stream(self.stream):
                for dst, src in zip(self.staging, sources):
                    dst.copy_(src, non_blocking=True)
                self.copied.record()
            values = self.staging
        self.pending = self.worker.submit(self._lerp, lerp, values)

    def _lerp(self, lerp: Callable[[list[torch.Tensor]], None], values: list[torch.Tensor]) -> None:
        if self.on_gpu:
            self.copied.synchronize()
        lerp(values)  # ShardedEMA.update runs under no_grad

    def fence(self) -> None:
        if self.on_gpu:
            torch.cuda.current_stream().wait_event(self.copied)  # on the GPU: the host goes on
        else:
            self.wait()

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()  # re-raises what failed in the worker


class TrainingEMAs:
    """What training keeps besides the weights: the `ema.decay` EMA and, with ema.posthoc.sigma_rels,
    one power-function EMA per sigma_rel, snapshotted every ema.posthoc.snapshot_every steps into
    <run>/posthoc/step<N>/rank<r>.pt for post-hoc reconstruction. With `ema.offload: cpu` they live
    in host memory and update beside training (OffloadedUpdates): call fence() before each optimizer
    step."""

    def __init__(self, cfg: Config, engine, rank: int, world_size: int):
        offload = cfg.ema.offload == "cpu"
        self.main = ShardedEMA(engine, rank, world_size, classic_beta(cfg.ema.decay, cfg.ema.warmup), offload)
        self.power = {sigma: ShardedEMA(engine, rank, world_size, partial(power_beta, sigma_rel_to_gamma(sigma)),
                                        offload) for sigma in cfg.ema.posthoc.sigma_rels}
        self.snapshot_every = cfg.ema.posthoc.snapshot_every
        self.offloaded = OffloadedUpdates(self.main.sources) if offload else None

    def all(self) -> list[ShardedEMA]:
        return [self.main, *self.power.values()]

    def update(self, step: int) -> None:
        if self.offloaded is None:
            for ema in self.all():
                ema.update(step)
        else:  # every EMA follows the same masters (one engine, one rank): one copy serves them all
            self.offloaded.submit(self.main.sources, lambda values: [ema.update(step, values) for ema in self.all()])

    def fence(self) -> None:
        if self.offloaded is not None:
            self.offloaded.fence()

    def wait(self) -> None:
        if self.offloaded is not None:
            self.offloaded.wait()

    def attach(self, engine) -> None:
        self.wait()
        for ema in self.all():
            ema.attach(engine)

    def state_dict(self) -> dict:
        self.wait()
        return {"main": self.main.state_dict(), "power": {s: e.state_dict() for s, e in self.power.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.wait()
        self.main.load_state_dict(state["main"])
        for sigma, ema in self.power.items():
            ema.load_state_dict(state["power"][sigma])

    def load_resharded(self, states: list[dict]) -> None:
        """`states`: every rank's state_dict() of a checkpoint written by another number of ranks."""
        self.wait()
        self.main.load_resharded([s["main"] for s in states])
        for sigma, ema in self.power.items():
            ema.load_resharded([s["power"][sigma] for s in states])

    def snapshot_due(self, step: int, last_step: int) -> bool:
        return bool(self.power) and (step % self.snapshot_every == 0 or step == last_step)

    def snapshot(self, posthoc_dir: Path, step: int, world) -> None:
        """Every rank writes its fragments of every power EMA; a file appears only when complete."""
        self.wait()
        with atomic_file(posthoc_dir / f"step{step:08d}" / f"rank{world.rank:03d}.pt", "wb") as f:
            torch.save({"step": step, "world_size": world.size,
                        "profiles": {s: e.state_dict() for s, e in self.power.items()}}, f)

    def digest(self, world, engine) -> dict[str, dict[str, list[float]]]:
        """Checksums of the full raw (fp32 master) and EMA weights and of Adam's moments, summed over
        every rank's fragments: the merge stage checks its consolidation against them, and a run
        resumed on another number of ranks can be checked against the run it continues."""
        self.wait()
        names = sorted(set().union(*map(set, world.gather(self.main.names))))  # a rank may hold none of some
        kinds = ("raw", "ema", *MOMENTS)
        parts = torch.zeros(len(kinds), len(names), 3, dtype=torch.float64)
        index = {n: i for i, n in enumerate(names)}
        for row, tensors in enumerate((self.main.sources, self.main.shadow)):
            for name, offset, values in zip(self.main.names, self.main.offsets, tensors):
                parts[row, index[name]] += checksum(values, offset)
        masters = zero0_masters(engine.optimizer)
        for row, key in enumerate(MOMENTS, start=2):
            for name, p in engine.module.named_parameters():
                if name not in index:  # frozen
                    continue
                offset, values = master_fragment(p, self.main.rank, self.main.world_size, masters, key, engine.optimizer)
                if values is not None:
                    parts[row, index[name]] += checksum(values, offset)
        if world.size > 1:
            torch.distributed.all_reduce(parts, group=world.control)
        return {kind: {n: parts[row, i].tolist() for n, i in index.items()} for row, kind in enumerate(kinds)}


MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state per parameter


def checksum(values: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """(sum, sum of squares, position-weighted sum) in float64 of a flat fragment starting at
    `offset`; additive over fragments, and the weighted sum notices misplaced elements."""
    x = values.detach().reshape(-1).to("cpu", torch.float64)
    weights = (torch.arange(offset, offset + x.numel(), dtype=torch.int64) % 251 + 1).to(torch.float64)
    return torch.stack([x.sum(), (x * x).sum(), (x * weights).sum()])


def master_fragment(p: torch.nn.Parameter, rank: int, world_size: int, masters: dict[int, torch.Tensor] | None = None,
                    key: str | None = None, optimizer=None) -> tuple[int, torch.Tensor | None]:
    """(flat offset, fp32 values) of this rank's share of parameter `p`, as a live view: of its master
    weights, or with `key` of that optimizer state of them (exp_avg, ...; None before the first step)."""
    try:
        if hasattr(p, "ds_id"):  # ZeRO-3: the local fp32 partition; the parameter itself is empty here
            part, _ = p._z3_optimizer._get_fp32_opt_state_partition(p, True, key)
            offset = rank * p.ds_tensor.ds_numel
            return offset, part[: max(0, min(part.numel(), p.ds_numel - offset))]
        if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and DeepSpeed's bf16 optimizer
            frag = p._hp_mapping
            if frag is None:
                return 0, None
            return frag.lp_fragment_address.start, frag.hp_fragment if key is None else frag.get_hp_fragment(key)
    except (KeyError, ValueError, TypeError):  # no such optimizer state (yet)
        return 0, None
    tensor = (masters or {}).get(id(p), p)
    if key is not None:  # ZeRO-0: the (wrapped) torch optimizer's state of the master tensor
        tensor = getattr(optimizer, "optimizer", optimizer).state.get(tensor, {}).get(key)
        if tensor is None:
            return 0, None
    flat = tensor.detach().view(-1)
    size = -(-flat.numel() // world_size)
    return rank * size, flat[rank * size : (rank + 1) * size]


def zero0_masters(optimizer) -> dict[int, torch.Tensor]:
    """ZeRO-0 in bf16/fp16: the fp32 master copy DeepSpeed's (un)fused fp16 optimizer keeps of each
    parameter, by id of the parameter (empty in fp32, where the parameters are the masters)."""
    if hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):  # unfused: one tensor each
        return {id(p): m for g16, g32 in zip(optimizer.fp16_groups, optimizer.fp32_groups) for p, m in zip(g16, g32)}
    if hasattr(optimizer, "fp32_groups_flat") and hasattr(optimizer, "fp16_groups"):  # fused: one flat buffer
        return {id(p): m for g16, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat)
                for p, m in zip(g16, split_flat(flat, [p.numel() for p in g16]))}
    return {}


def split_flat(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(flat[: sum(sizes)], sizes))


def gather_fragments(states: list[dict]) -> dict[str, torch.Tensor]:
    """Flat fp32 tensors assembled from every rank's EMA fragments (checked to cover each exactly)."""
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for state in states:
        for name, (offset, values) in state["fragments"].items():
            parts.setdefault(name, []).append((offset, values))
    full = {}
    for name, frags in parts.items():
        frags.sort(key=lambda f: f[0])
        starts = [o for o, _ in frags]
        if starts != list(np.cumsum([0] + [v.numel() for _, v in frags[:-1]])):
            raise ValueError(f"EMA fragments of {name} overlap or leave gaps")
        full[name] = torch.cat([v.float() for _, v in frags])
    return full


def load_rank_files(folder: Path, what: str) -> list[dict]:
    files = sorted(folder.glob("rank*.pt"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no per-rank {what} files")
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    expected = states[0].get("world_size") or states[0]["ema"]["main"]["world_size"]
    if len(states) != expected:
        raise ValueError(f"{folder} has {len(states)} of {expected} per-rank {what} files")
    return states


def load_ema(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The `ema.decay` EMA of a checkpoint as flat tensors, gathered from every rank's file."""
    return gather_fragments([s["ema"]["main"] for s in load_rank_files(ckpt_dir / tag, "EMA")])
