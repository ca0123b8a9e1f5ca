"""Training checkpoints: save on every rank, count only complete ones, resume only matching ones.

    <run>/checkpoints/
        step00000400/            DeepSpeed's files (model states, ZeRO optimizer shards of every rank)
            rank000.pt ...       per rank: RNG states and this rank's EMA shard
            meta.json            written last, by rank 0, after every rank finished: "complete"
        latest                   the newest complete tag (written after its meta.json)

A kill at any moment leaves either the previous checkpoint as `latest` or the new one complete.
Tags without meta.json are half-written and are deleted before the next run starts.

A checkpoint resumes on another number of ranks when the global batch stays the same (micro-batch x
gradient accumulation x ranks; e.g. 2 ranks -> 1 with train.grad_accum doubled): ZeRO-1/2/3
checkpoints are first converted once into DeepSpeed's universal checkpoint (`<tag>/universal`,
deepspeed.checkpoint.ds_to_universal), which the engine re-partitions for the new ranks on load
(checkpoint.load_universal); ZeRO-0 keeps the whole optimizer state in rank 0's file and loads as
it is. The EMA shards of every old rank are reassembled and cut anew; the data stream finishes the
epoch with the samples no old rank reached (workflow/latents.py, `origin`).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config
from .fsutil import atomic_file, read_json, sha256_json, write_json

# Keys that may change between a checkpoint and its resume: how long and how often, not what.
RESUMABLE_CHANGES = {"train.steps", "train.epochs", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                     "train.resume", "train.max_bad_steps", "train.wandb", "train.procs", "train.rendezvous_timeout_s", "cache.procs",
                     "cache.batch_size", "sample.batch_size", "ema.use", "ema.offload", "ema.target_sigma_rel", "ema.fuse_lora",
                     "ema.posthoc.snapshot_every",
                     "train.compile", "train.compile_shapes", "train.compile_cache", "train.profile_at",
                     "train.memory_cap_gb", "train.expandable_segments", "train.activation_memory_budget",
                     "train.gradient_checkpointing"}  # how the step runs, not what it computes


def training_settings(cfg: Config) -> dict[str, Any]:
    """The settings a checkpoint must share with the config to be resumed, flattened to dotted keys."""
    full = cfg.model_dump(mode="json", include={"train", "ema", "model", "cache"})
    flat = _flatten(full)
    return {k: v for k, v in flat.items() if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)}


def training_fingerprint(cfg: Config) -> str:
    return sha256_json(training_settings(cfg))


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {k: v for key, sub in node.items() for k, v in _flatten(sub, f"{prefix}.{key}" if prefix else key).items()}
    return {prefix: node}


def checkpoint_tag(step: int) -> str:
    return f"step{step:08d}"


def latest_checkpoint(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def global_batch(cfg: Config, world_size: int) -> int:
    return cfg.train.micro_batch * cfg.train.grad_accum * world_size


def resume_problems(cfg: Config, ckpt_dir: Path, world_size: int) -> list[str]:
    """What stops the newest checkpoint from being resumed under `cfg` (empty: resumable or none)."""
    tag = latest_checkpoint(ckpt_dir)
    if tag is None:
        return []
    meta = read_json(ckpt_dir / tag / "meta.json", "checkpoint record")
    now, then = training_settings(cfg), meta.get("settings", {})
    reshaped = meta.get("world_size") != world_size
    per_rank = {"train.micro_batch", "train.grad_accum"} if reshaped and "global_batch" in meta else set()
    changed = [f"{k}: {then.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}"
               for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k) and k not in per_rank]
    if reshaped and "global_batch" not in meta:  # written before resuming on other geometries existed
        changed.append(f"ranks: {meta.get('world_size')} -> {world_size}")
    elif reshaped and global_batch(cfg, world_size) != meta["global_batch"]:
        accum, rest = divmod(meta["global_batch"], cfg.train.micro_batch * world_size)
        hint = (f"set train.grad_accum={accum} to keep it" if accum and not rest else
                f"choose train.micro_batch x train.grad_accum = {meta['global_batch'] / world_size:g} per rank")
        changed.append(f"ranks {meta['world_size']} -> {world_size} changes the global batch {meta['global_batch']} -> "
                       f"{global_batch(cfg, world_size)} (micro_batch x grad_accum x ranks): {hint}")
    return changed


def resumed_progress(ckpt_dir: Path, world_size: int) -> tuple[dict[str, Any] | None, bool]:
    """(the progress the newest complete checkpoint resumes, whether it was written by another
    number of ranks); (None, False) without one. On another geometry the data streams continue from
    an `origin`: where every old rank stood (workflow/latents.py), positions counting from 0 again."""
    tag = latest_checkpoint(ckpt_dir)
    if tag is None:
        return None, False
    meta = read_json(ckpt_dir / tag / "meta.json", "checkpoint record")
    progress = {k: meta[k] for k in PROGRESS_KEYS if k in meta}
    if meta["world_size"] == world_size:
        return progress, False
    for stream, position, micro_batch in (("origin", "position", meta["micro_batch"]),
                                          ("prior_origin", "prior_position", 1)):
        progress[stream] = {"world_size": meta["world_size"], "micro_batch": micro_batch,
                            "position": progress.get(position, 0), "origin": progress.get(stream)}
        progress[position] = 0
    return progress, True


PROGRESS_KEYS = ("step", "epoch", "position", "prior_position", "bad_steps", "origin", "prior_origin")
UNIVERSAL = "universal"  # <tag>/universal: the tag as DeepSpeed's universal checkpoint


def to_universal(tag_dir: Path) -> Path:
    """Convert a ZeRO-1/2/3 checkpoint into DeepSpeed's universal checkpoint, once (a folder that
    appears only when complete); returns it."""
    out = tag_dir / UNIVERSAL
    if out.is_dir():
        return out
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as convert

    partial = tag_dir / f"{UNIVERSAL}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    # One worker each: the converter forks its workers, and this process may hold CUDA.
    convert(Namespace(input_folder=str(tag_dir), output_folder=str(partial), num_extract_workers=1,
                      num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    (tag_dir / "latest_universal").unlink(missing_ok=True)  # the converter's pointer, unused here
    partial.rename(out)
    return out


def loads_as_universal(cfg: Config, reshaped: bool) -> bool:
    """Whether a checkpoint of another geometry loads as a universal one (ZeRO >= 1; ZeRO-0 loads as it is)."""
    return reshaped and cfg.train.zero_stage > 0


def prepare_dir(cfg: Config, ckpt_dir: Path, world_size: int) -> None:
    """Before any rank starts: drop half-written tags; with train.resume never, drop everything; else
    refuse a checkpoint that the config cannot continue, saying what changed."""
    if cfg.train.resume == "never":
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            if d.is_dir() and d.name.startswith("step") and not (d / "meta.json").is_file():
                shutil.rmtree(d)  # a save cut short: never resumed, never kept
    tag = latest_checkpoint(ckpt_dir)
    changed = resume_problems(cfg, ckpt_dir, world_size)
    if changed:
        raise ValueError(f"checkpoint {ckpt_dir / tag} cannot be resumed with this config; "
                         f"changed: {'; '.join(changed)}. Set train.resume=never (or a new run name) to start fresh")
    if loads_as_universal(cfg, resumed_progress(ckpt_dir, world_size)[1]):
        meta = read_json(ckpt_dir / tag / "meta.json", "checkpoint record")
        print(f"train: checkpoint {tag} was written by {meta['world_size']} ranks; converting it for "
              f"{world_size} (DeepSpeed universal checkpoint)", file=sys.stderr, flush=True)
        to_universal(ckpt_dir / tag)
    # Post-hoc EMA snapshots past the step training resumes from belong to a run that is being
    # replayed (or, with no checkpoint, to an earlier run): drop them; the replay writes them again.
    resume_step = read_json(ckpt_dir / tag / "meta.json", "checkpoint record")["step"] if tag else 0
    posthoc = ckpt_dir.parent / "posthoc"
    for snap in posthoc.glob("step*") if posthoc.is_dir() else []:
        if int(snap.name[4:]) > resume_step:
            shutil.rmtree(snap)


def rng_states() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


EXIT_SAVE_FAILED = 4


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. the filesystem is full); the previous one is intact."""


def save(engine, ckpt_dir: Path, progress: dict[str, Any], ema, cfg: Config, world, lora: bool) -> str:
    """Every rank calls this. `progress` (step, epoch, data position, bad steps) goes into DeepSpeed's
    client state; RNG states and the EMA shard into this rank's own file."""
    tag = checkpoint_tag(progress["step"])
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=dict(progress), save_latest=False,
                               exclude_frozen_parameters=lora)
        with atomic_file(ckpt_dir / tag / f"rank{world.rank:03d}.pt", "wb") as f:
            torch.save({"rng": rng_states(), "ema": ema.state_dict(), "progress": progress}, f)
        error = None
    except (OSError, RuntimeError) as e:  # a full or failing filesystem (torch wraps some as RuntimeError)
        error = CheckpointSaveError(f"saving checkpoint {ckpt_dir / tag} failed on rank {world.rank}: {e}; the "
                                    f"previous checkpoint {latest_checkpoint(ckpt_dir) or '(none)'} is intact and "
                                    f"a rerun resumes from it")
    if error is not None:
        if world.size == 1:
            raise error
        # The other ranks may be waiting in one of DeepSpeed's collectives that this rank skipped:
        # leave now, with the error, and let the launcher (or srun --kill-on-bad-exit) end them.
        print(f"error: {error}", file=sys.stderr, flush=True)
        os._exit(EXIT_SAVE_FAILED)
    torch.distributed.barrier()
    if world.is_main:
        write_json(ckpt_dir / tag / "meta.json", {**progress, "world_size": world.size,
                                                  "micro_batch": cfg.train.micro_batch,
                                                  "global_batch": global_batch(cfg, world.size),
                                                  "fingerprint": training_fingerprint(cfg),
                                                  "settings": training_settings(cfg)})
        with atomic_file(ckpt_dir / "latest") as f:
            f.write(tag)
        complete = sorted(d.name for d in ckpt_dir.iterdir() if (d / "meta.json").is_file())
        wanted = {checkpoint_tag(s) for s in cfg.sample.checkpoints if s != "last"}  # sampled later
        for old in complete[: -cfg.train.keep_checkpoints]:
            if old not in wanted:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    torch.distributed.barrier()  # nobody races ahead into a save that pruning could touch
    return tag


def load(engine, ckpt_dir: Path, ema, world, lora: bool, universal: bool) -> None:
    """Restore engine, EMA and RNG states from the newest complete checkpoint (its progress:
    resumed_progress). `universal`: the engine was built to load it as a universal checkpoint."""
    tag = latest_checkpoint(ckpt_dir)
    if universal:
        _, client = engine.load_checkpoint(str(ckpt_dir / tag), tag=UNIVERSAL)
        steps_beside_their_parameters(engine.optimizer)
    else:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=not lora)
    if client is None:
        raise ValueError(f"checkpoint {ckpt_dir / tag} could not be loaded by DeepSpeed")
    ema.attach(engine)
    own_file = ckpt_dir / tag / f"rank{world.rank:03d}.pt"
    written_by = read_json(ckpt_dir / tag / "meta.json", "checkpoint record")["world_size"]
    if written_by == world.size:
        own = torch.load(own_file, map_location="cpu", weights_only=False)
        ema.load_state_dict(own["ema"])
    else:
        from .sharded_ema import load_rank_files

        states = load_rank_files(ckpt_dir / tag, "EMA")
        ema.load_resharded([state["ema"] for state in states])
        own = states[world.rank] if world.rank < len(states) else None
    if own is not None:  # a new rank draws from its step_generator only; the global RNGs keep the seed's
        set_rng_states(own["rng"])


def steps_beside_their_parameters(optimizer) -> None:
    """DeepSpeed's universal load leaves AdamW's `step` on the CPU; torch's fused AdamW wants it on
    its parameter's device (torch's own load_state_dict moves it there)."""
    base = getattr(optimizer, "optimizer", optimizer)
    defaults = getattr(base, "defaults", {})
    if not (defaults.get("fused") or defaults.get("capturable")):  # the others keep `step` on the CPU
        return
    for param, state in base.state.items():
        step = state.get("step") if isinstance(state, dict) else None
        if torch.is_tensor(step) and torch.is_tensor(param) and step.device != param.device:
            state["step"] = step.to(param.device)
