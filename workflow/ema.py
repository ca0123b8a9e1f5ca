"""EMA of the trained weights, and stage `ema`: merge a training checkpoint into a diffusers model.

Training keeps EMAs sharded like ZeRO's optimizer state (ShardedEMA, TrainingEMAs). The merge
consolidates the last DeepSpeed checkpoint (any ZeRO stage 0-3, any number of ranks) into full fp32
weights, gathers the EMA shards (or reconstructs a post-hoc EMA, see posthoc.py), checks both
against checksums the engine computed at the end of training, and writes `<run>/model/`:
- full mode: a diffusers pipeline folder (safetensors) whose denoiser (UNet) holds the EMA weights
  (`ema.use: true`) or the raw ones; the other set beside it in `unet_raw/` or `unet_ema/`;
- lora mode: `pytorch_lora_weights.safetensors` (diffusers format, `pipe.load_lora_weights`), the
  other set in `lora_raw/` or `lora_ema/`, and with `ema.fuse_lora` the full pipeline, adapters fused.

    python -m workflow.ema --config config.yaml --model resources/models/tiny-digits \
        --run-dir results/runs/digits-tiny --out results/runs/digits-tiny/model
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .cli import run, stage_main
from .config import Config
from .families import family_of
from .fsutil import atomic_dir, atomic_file, read_json, write_json
from .posthoc import power_beta, sigma_rel_to_gamma, solve_coefficients


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

    def snapshot_due(self, step: int, last_step: int) -> bool:
        return bool(self.power) and (step % self.snapshot_every == 0 or step == last_step)

    def snapshot(self, posthoc_dir: Path, step: int, world) -> None:
        """Every rank writes its fragments of every power EMA; a file appears only when complete."""
        self.wait()
        with atomic_file(posthoc_dir / f"step{step:08d}" / f"rank{world.rank:03d}.pt", "wb") as f:
            torch.save({"step": step, "world_size": world.size,
                        "profiles": {s: e.state_dict() for s, e in self.power.items()}}, f)

    def digest(self, world) -> dict[str, dict[str, list[float]]]:
        """Checksums of the full raw (fp32 master) and EMA weights, summed over every rank's fragments,
        so the merge stage can check its consolidation against what the engine held."""
        self.wait()
        names = sorted(set().union(*map(set, world.gather(self.main.names))))  # a rank may hold none of some
        parts = torch.zeros(2, len(names), 3, dtype=torch.float64)
        index = {n: i for i, n in enumerate(names)}
        for row, tensors in enumerate((self.main.sources, self.main.shadow)):
            for name, offset, values in zip(self.main.names, self.main.offsets, tensors):
                parts[row, index[name]] += checksum(values, offset)
        if world.size > 1:
            torch.distributed.all_reduce(parts, group=world.control)
        return {kind: {n: parts[row, i].tolist() for n, i in index.items()} for row, kind in enumerate(("raw", "ema"))}


def checksum(values: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """(sum, sum of squares, position-weighted sum) in float64 of a flat fragment starting at
    `offset`; additive over fragments, and the weighted sum notices misplaced elements."""
    x = values.detach().reshape(-1).to("cpu", torch.float64)
    weights = (torch.arange(offset, offset + x.numel(), dtype=torch.int64) % 251 + 1).to(torch.float64)
    return torch.stack([x.sum(), (x * x).sum(), (x * weights).sum()])


def master_fragment(p: torch.nn.Parameter, rank: int, world_size: int,
                    masters: dict[int, torch.Tensor] | None = None) -> tuple[int, torch.Tensor | None]:
    """(flat offset, fp32 values) of this rank's share of parameter `p`, as a live view."""
    if hasattr(p, "ds_id"):  # ZeRO-3: the local fp32 partition; the parameter itself is empty here
        part, _ = p._z3_optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=True)
        offset = rank * p.ds_tensor.ds_numel
        return offset, part[: max(0, min(part.numel(), p.ds_numel - offset))]
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and DeepSpeed's bf16 optimizer
        frag = p._hp_mapping
        return (0, None) if frag is None else (frag.lp_fragment_address.start, frag.hp_fragment)
    flat = (masters or {}).get(id(p), p).detach().view(-1)
    size = -(-flat.numel() // world_size)
    return rank * size, flat[rank * size : (rank + 1) * size]


def zero0_masters(optimizer) -> dict[int, torch.Tensor]:
    """ZeRO-0 in bf16/fp16: the fp32 master copy DeepSpeed's (un)fused fp16 optimizer keeps of each
    parameter, by id of the parameter (empty in fp32, where the parameters are the masters)."""
    if hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):  # unfused: one tensor each
        return {id(p): m for g16, g32 in zip(optimizer.fp16_groups, optimizer.fp32_groups) for p, m in zip(g16, g32)}
    if hasattr(optimizer, "fp32_groups_flat") and hasattr(optimizer, "fp16_groups"):  # fused: one flat buffer
        return {id(p): m for g16, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat)
                for p, m in zip(g16, _split(flat, [p.numel() for p in g16]))}
    return {}


def _split(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
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


# ---------------------------------------------------------------- merge stage


def model_states_file(ckpt_dir: Path, tag: str) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):  # ZeRO 0-2, ZeRO-3
        if (ckpt_dir / tag / name).is_file():
            return ckpt_dir / tag / name
    raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} is incomplete: no DeepSpeed model states file")


def consolidate(ckpt_dir: Path, tag: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Full fp32 weights of the trained parameters (all of the UNet, or the LoRA adapters) and the
    client state of one DeepSpeed checkpoint, whatever the ZeRO stage and number of ranks."""
    states = torch.load(model_states_file(ckpt_dir, tag), map_location="cpu", weights_only=False)
    zero_stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if zero_stage > 0:
        # The fp32 master weights live partitioned in the optimizer states of every rank.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, exclude_frozen_parameters=True)
    else:
        weights = zero0_master_weights(states)
    return {k: v.float().contiguous() for k, v in weights.items()}, states


def zero0_master_weights(states: dict) -> dict[str, torch.Tensor]:
    """ZeRO-0: the module weights, or in bf16/fp16 the optimizer's fp32 masters of them (saved in
    optimizer order, which is the order of the trained parameters in the module)."""
    module, optim = states["module"], states.get("optimizer") or {}
    names = [n for n in module if n not in set(states.get("buffer_names") or [])]
    if "fp32_groups" in optim:
        masters = [m for group in optim["fp32_groups"] for m in group]
    elif "fp32_groups_flat" in optim:
        masters = _split(torch.cat([f.view(-1) for f in optim["fp32_groups_flat"]]), [module[n].numel() for n in names])
    else:
        return module
    if len(masters) != len(names):
        raise ValueError(f"checkpoint has {len(masters)} fp32 master tensors for {len(names)} parameters")
    return dict(module) | {n: m.view(module[n].shape) for n, m in zip(names, masters)}


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


def reconstruct_posthoc(posthoc_dir: Path, target_step: int, target_sigma_rel: float) -> tuple[dict, dict]:
    """The EMA of profile `target_sigma_rel` at `target_step`, as a least-squares combination of every
    snapshot up to that step (Karras et al. 2024); returns flat tensors and a report of the fit."""
    snaps = sorted(d for d in posthoc_dir.glob("step*") if int(d.name[4:]) <= target_step) if posthoc_dir.is_dir() else []
    if not snaps:
        raise FileNotFoundError(f"no post-hoc EMA snapshots in {posthoc_dir} (ema.posthoc.sigma_rels set in training?)")
    columns = [(d, sigma) for d in snaps for sigma in load_rank_files(d, "snapshot")[0]["profiles"]]
    steps = [int(d.name[4:]) for d, _ in columns]
    gammas = [sigma_rel_to_gamma(sigma) for _, sigma in columns]
    coeffs, error = solve_coefficients(steps, gammas, target_step, sigma_rel_to_gamma(target_sigma_rel))
    total: dict[str, torch.Tensor] = {}
    for d in snaps:  # one snapshot folder in memory at a time
        states = load_rank_files(d, "snapshot")
        for sigma in states[0]["profiles"]:
            c = float(coeffs[columns.index((d, sigma))])
            for name, flat in gather_fragments([s["profiles"][sigma] for s in states]).items():
                total[name] = total[name] + c * flat.double() if name in total else c * flat.double()
    report = {"target_sigma_rel": target_sigma_rel, "target_step": target_step, "snapshots": len(snaps),
              "profiles": sorted({sigma for _, sigma in columns}), "relative_profile_error": error,
              "coefficients": {f"{d.name}@{sigma}": float(c) for (d, sigma), c in zip(columns, coeffs)}}
    return {k: v.float() for k, v in total.items()}, report


def verify_against_engine(weights: dict[str, torch.Tensor], digest: dict[str, list[float]], what: str) -> None:
    """Refuse to write a model whose consolidated weights differ from what the engine held."""
    if set(weights) != set(digest):
        raise ValueError(f"{what}: consolidated parameters differ from training's: "
                         f"{sorted(set(weights) ^ set(digest))[:5]}")
    for name, expected in digest.items():
        got = checksum(weights[name]).tolist()
        scale = abs(expected[0]) + expected[1] ** 0.5 * weights[name].numel() ** 0.5 + 1e-12
        if any(abs(g - e) > 1e-7 * (abs(e) + scale) for g, e in zip(got, expected)):
            raise ValueError(f"{what}: {name} differs from the weights the engine held (checksums {got} vs {expected})")


def merge(cfg: Config, model_dir: Path, run_dir: Path, out: Path) -> dict:
    info = read_json(run_dir / "train.json", "training result")
    ckpt_dir, tag = run_dir / "checkpoints", info["checkpoint"]
    raw, states = consolidate(ckpt_dir, tag)
    verify_against_engine(raw, info["digest"]["raw"], "raw weights")
    ema = load_ema(ckpt_dir, tag)
    verify_against_engine(ema, info["digest"]["ema"], "EMA weights")
    report = {"checkpoint": tag, "step": info["final_step"], "mode": cfg.train.mode,
              "weights": "ema" if cfg.ema.use else "raw", "ema_decay": cfg.ema.decay,
              "prediction_type": info["prediction_type"], "verified_against_engine": True}
    if cfg.ema.target_sigma_rel is not None:
        ema, report["posthoc"] = reconstruct_posthoc(run_dir / "posthoc", info["final_step"], cfg.ema.target_sigma_rel)
        report["weights"] = "posthoc-ema" if cfg.ema.use else "raw"
    ema = {k: v.view(raw[k].shape) for k, v in ema.items()}
    main, other = (ema, raw) if cfg.ema.use else (raw, ema)
    with atomic_dir(out) as tmp:
        if cfg.train.mode == "lora":
            report |= export_lora(cfg, model_dir, main, other, tmp, info["prediction_type"])
        else:
            other_name = family_of(model_dir).denoiser + ("_raw" if cfg.ema.use else "_ema")  # unet_raw for a UNet
            report |= export_full(model_dir, main, other, tmp, other_name,
                                  info["prediction_type"])
        write_json(tmp / "merge.json", report)
    print(f"ema: merged {ckpt_dir / tag} ({report['weights']} weights, {cfg.train.mode}) -> {out}")
    return report


def checkpoint_denoiser(cfg: Config, model_dir: Path, ckpt_dir: Path, tag: str):
    """The denoiser (UNet, transformer) of one training checkpoint (its EMA weights when ema.use),
    LoRA adapters fused in."""
    from .models import add_lora, load_denoiser

    raw, _ = consolidate(ckpt_dir, tag)
    weights = {k: v.view(raw[k].shape) for k, v in load_ema(ckpt_dir, tag).items()} if cfg.ema.use else raw
    denoiser = load_denoiser(model_dir)
    if cfg.train.mode == "lora":
        load_adapters(add_lora(denoiser, cfg.train.lora), weights)
        denoiser.fuse_lora()
        denoiser.unload_lora()
    else:
        denoiser.load_state_dict(weights, strict=True)
    return denoiser


def load_adapters(unet, weights: dict) -> None:
    """Trained LoRA weights into `unet`'s adapters (the frozen base weights are not in them); every
    adapter weight must be there, so a checkpoint of other adapters is refused, not half-loaded."""
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if unexpected or any("lora_" in k for k in missing):
        raise ValueError(f"LoRA weights do not fit the adapters: {(unexpected or missing)[:3]}")


def save_pipeline(model_dir: Path, denoiser, folder: Path, prediction_type: str) -> None:
    """The base pipeline with the trained `denoiser`, its scheduler predicting what it was trained to;
    the rest (safety checker, feature extractor, scheduler settings) as the base has it."""
    from .models import load_pipeline

    pipe = load_pipeline(model_dir, **{family_of(model_dir).denoiser: denoiser})
    pipe.scheduler.register_to_config(prediction_type=prediction_type)
    pipe.save_pretrained(folder, safe_serialization=True)
    keep_settings_components(model_dir, folder)


def keep_settings_components(base: Path, folder: Path) -> None:
    """Components without weights (feature extractor, tokenizer) as the base has them: a re-save can
    change them (transformers names its image processor's class after the backend it found)."""
    from .models import is_weights, pipeline_components

    index_path = folder / "model_index.json"
    index, base_index = read_json(index_path, "model index"), read_json(base / "model_index.json", "model index")
    for name in pipeline_components(base):
        has_weights = any(is_weights(f.name) for f in (base / name).iterdir())
        if name == "scheduler" or has_weights:
            continue
        shutil.rmtree(folder / name, ignore_errors=True)
        shutil.copytree(base / name, folder / name)
        index[name] = base_index[name]
    write_json(index_path, index)


def export_full(model_dir: Path, main: dict, other: dict, tmp: Path, other_name: str, prediction_type: str) -> dict:
    from .models import load_denoiser

    unet = load_denoiser(model_dir)
    unet.load_state_dict(other, strict=True)
    unet.save_pretrained(tmp / other_name, safe_serialization=True)
    unet.load_state_dict(main, strict=True)
    save_pipeline(model_dir, unet, tmp, prediction_type)
    return {"other_weights": other_name}


def export_lora(cfg: Config, model_dir: Path, main: dict, other: dict, tmp: Path, prediction_type: str) -> dict:
    """pytorch_lora_weights.safetensors (diffusers format, for pipe.load_lora_weights) of the chosen
    weights, the other set in lora_raw/ or lora_ema/, and with ema.fuse_lora the fused full model."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from .models import add_lora, load_denoiser, pipeline_class

    unet = add_lora(load_denoiser(model_dir), cfg.train.lora)
    metadata = unet.peft_config["default"].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # a set: not JSON
    # Adapter dropout is a training setting. diffusers' load_lora_weights builds the adapters from
    # this metadata with dropout layers in training mode inside an eval-mode UNet, so a file that
    # carried train.lora.dropout would generate with random adapter dropout.
    metadata["lora_dropout"] = 0.0

    def save_adapter(weights: dict, folder: Path) -> None:
        load_adapters(unet, weights)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        kwarg = family_of(model_dir).lora_layers_kwarg  # unet_lora_layers: the keyword names the denoiser
        pipeline_class(model_dir).save_lora_weights(folder, safe_serialization=True, **{
            kwarg: layers, kwarg.replace("_layers", "_adapter_metadata"): metadata})

    other_name = "lora_raw" if cfg.ema.use else "lora_ema"
    save_adapter(other, tmp / other_name)
    save_adapter(main, tmp)
    if cfg.ema.fuse_lora:
        unet.fuse_lora()
        unet.unload_lora()
        save_pipeline(model_dir, unet, tmp, prediction_type)
    return {"other_weights": other_name, "lora_file": "pytorch_lora_weights.safetensors", "fused": cfg.ema.fuse_lora,
            "base_model": str(model_dir)}


def main(argv: list[str] | None = None) -> None:
    args, cfg = stage_main("ema", __doc__, argv, {"model": "base model folder", "run_dir": "run folder", "out": "output model folder"})
    merge(cfg, Path(args.model), Path(args.run_dir), Path(args.out))


if __name__ == "__main__":
    run(main)
