"""Stage `train`: DeepSpeed training of the UNet (full or LoRA) from cached latents.

Read top to bottom: load the UNet (with LoRA adapters in lora mode) and the noise schedule, build
the DeepSpeed engine from the project config, resume from the newest complete checkpoint, then for
each optimizer step: micro-batches -> loss -> engine.backward/step -> EMA -> log -> checkpoint.

    python -m workflow.train --config config.yaml --latents results/latents/digits/tiny-digits_32px \
        --model resources/models/tiny-digits --data results/data/digits --run-dir results/runs/digits-tiny

Started once, it starts `train.procs` ranks (CPU, gloo) or one per GPU; every rank saves. Exit codes:
0 done (<run-dir>/train.json written), 2 bad input, 3 too many non-finite losses, 4 a checkpoint
could not be written (the previous one is intact), 75 stopped by SIGTERM/SIGUSR1 after saving a
checkpoint (rerun to resume).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoints
from .cache import cache_fingerprint, fingerprint_mismatch
from .cli import run, stage_main
from .config import Config
from .distributed import (EXIT_PREEMPTED, RanksMissing, StopRequest, World, device_for, init_world, launched,
                          procs_wanted, relaunch, stop_when_parent_dies)
from .sharded_ema import TrainingEMAs
from .engine import build_engine, check_zero_section, deepspeed_config
from .fsutil import atomic_file, hold_run_lock, read_json, write_json
from .gpu_memory import check_memory_cap, peak_gpu_memory, set_up_gpu_memory
from .auto import Hardware, check_card, resolve_here, steps_for
from .families import Family, family_of
from .latents import LatentStream, PriorPart, held_out
from .models import add_lora, checkpointed_blocks, latent_scaling, load_denoiser, load_vae
from .profiling import StepProfiler, phase

# The UNet's weight dtype (bf16-mixed: fp32 weights, DeepSpeed runs the forward under bf16 autocast).
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.float32, "fp16": torch.float16}
EXIT_DIVERGED = 3
EXIT_SAVE_FAILED = checkpoints.EXIT_SAVE_FAILED


class TrainingDiverged(RuntimeError):
    """More micro-steps than train.max_bad_steps had a non-finite loss."""


def trainable_unet(cfg: Config, model_dir: Path) -> torch.nn.Module:
    """The base UNet; in lora mode frozen, with peft LoRA adapters as the only trainable weights."""
    unet = load_denoiser(model_dir)
    family_of(model_dir).set_checkpointing(unet, checkpointed_blocks(model_dir, cfg.train.gradient_checkpointing))
    return add_lora(unet, cfg.train.lora) if cfg.train.mode == "lora" else unet


def step_generator(seed: int, position: int, rank: int, device: torch.device, origin_key: tuple[int, ...] = ()) -> torch.Generator:
    """Randomness (noise, timesteps, caption choice) as a pure function of the data position: a
    resumed run draws exactly what an uninterrupted run draws for the same micro-batch. After a
    change of geometry positions count from 0 again: `origin_key` keeps those draws new."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, position, rank, *origin_key]).generate_state(1, np.uint64)[0] >> 1))
    return g


def diffusion_loss(engine, objective, batch: dict, nulls: tuple[torch.Tensor, torch.Tensor | None],
                   cfg: Config, scaling: tuple[float, float], family: Family, gen: torch.Generator,
                   device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = cfg.train
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    n, variants = batch["mean"].shape[:2]
    rows = torch.arange(n, device=device)
    u = torch.rand(n, 3, generator=gen, device=device)  # flip variant, caption, dropout: no host sync
    variant = (u[:, 0] * variants).long().clamp(max=variants - 1)
    mean, std = batch["mean"][rows, variant].float(), batch["std"][rows, variant].float()
    # Latents are drawn from the cached VAE posterior every step, then put in the denoiser's space.
    latents = mean + std * torch.randn(mean.shape, generator=gen, device=device)
    scale, shift = scaling
    latents = (latents - shift) * scale
    # One of each sample's captions; a share replaced by the null caption (classifier-free guidance):
    # for SDXL the pooled embedding with it (see Family.null_caption), the size conditions kept.
    caption = (u[:, 1] * batch["n_texts"]).long().clamp(max=batch["texts"].shape[1] - 1)
    dropped = u[:, 2] < t.caption_dropout
    null_text, null_pooled = nulls
    text = torch.where(dropped[:, None, None], null_text, batch["texts"][rows, caption].float())
    pooled = None
    if "pooled" in batch:
        pooled = torch.where(dropped[:, None], null_pooled, batch["pooled"][rows, caption].float())

    noise = torch.randn(latents.shape, generator=gen, device=device)
    if t.noise_offset:  # per-channel offsets let the model shift overall brightness
        noise = noise + t.noise_offset * torch.randn((n, latents.shape[1], 1, 1), generator=gen, device=device)
    timesteps = objective.random_timesteps(n, gen, device, tuple(latents.shape[1:]))
    noised_with = noise
    if t.input_perturbation:  # the input sees perturbed noise, the target the unperturbed one
        noised_with = noise + t.input_perturbation * torch.randn(latents.shape, generator=gen, device=device)
    noisy = objective.noisy(latents, noised_with, timesteps)
    target = objective.target(latents, noise, timesteps)
    pred = family.predict(engine, noisy, timesteps, text, pooled, batch["size"][rows, variant], dtype, objective.guidance)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if t.snr_gamma:
        per_sample = per_sample * objective.snr_weights(timesteps, t.snr_gamma)
    if "loss_weight" in batch:  # data.prior: the prior samples' weight
        per_sample = per_sample * batch["loss_weight"]
    return per_sample.mean()


class JsonlLog:
    """results/runs/<run>/log.jsonl, on rank 0. On resume, records past the checkpoint's step (written
    before a kill) are dropped, so each step appears once."""

    def __init__(self, path: Path, enabled: bool, resumed_at: int):
        self.file = None
        # the loss logged at the checkpoint's step (rank 0): train.json's final_loss when a rerun
        # finds training already finished and runs no step (it wrote NaN, which JSON has no word for)
        self.resumed_loss = None
        if not enabled:
            return
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_at]
            with atomic_file(path) as f:
                f.write("".join(line + "\n" for line in kept))
            last = json.loads(kept[-1]) if kept else {}
            self.resumed_loss = last.get("loss") if last.get("step") == resumed_at else None
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


def check_cache(cfg: Config, latent_dir: Path, model_dir: Path, data_dir: Path) -> None:
    """Refuse latents made from another model, data set or caching policy, naming what differs."""
    manifest = read_json(latent_dir / "manifest.json", "latent cache manifest")
    differs = fingerprint_mismatch(cache_fingerprint(cfg, model_dir, data_dir), manifest.get("fingerprint", {}))
    if differs:
        raise ValueError(f"latent cache {latent_dir} does not match this config: {', '.join(differs)} differ(s); "
                         f"rerun the cache stage (snakemake --forcerun cache)")


def with_steps(cfg: Config, latent_dir: Path, world_size: int) -> tuple[Config, str]:
    """`cfg` with train.steps and warmup_steps numbers (auto: from the data set's size, workflow/auto.py),
    and why. The checkpoints keep recording the settings as given (auto), so a resume compares those."""
    manifest = read_json(latent_dir / "manifest.json", "latent cache manifest")
    samples = sum(int(s["count"]) - len(h) for s, h in zip(manifest["shards"], held_out(manifest, cfg.train.val_samples)))
    t = cfg.train
    prior = cfg.data.prior.per_micro_batch(t.micro_batch) if cfg.data.prior.source else 0
    steps, warmup, why = steps_for(cfg, samples, (t.micro_batch - prior) * t.grad_accum * world_size)
    return cfg.model_copy(update={"train": t.model_copy(update={"steps": steps, "warmup_steps": warmup})}), why


def train(cfg: Config, latent_dir: Path, model_dir: Path, run_dir: Path) -> dict[str, Any] | None:
    stop = StopRequest()  # before anything slow, so an early signal is not lost
    world = init_world(cfg.train.rendezvous_timeout_s)
    device = device_for(world)
    as_given = cfg  # what checkpoints record and a resume compares (train.steps may be auto)
    cfg, steps_why = with_steps(cfg, latent_dir, world.size)
    if world.is_main:
        print(f"train: {cfg.train.steps} steps ({steps_why}), {cfg.train.warmup_steps} warm-up", flush=True)
    t = cfg.train
    set_up_gpu_memory(device, t)
    dtype = PRECISION_DTYPES[t.precision]
    ckpt_dir = run_dir / "checkpoints"
    if world.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "monitor").mkdir(exist_ok=True)
    if t.wandb.enabled:
        import os

        os.environ.setdefault("WANDB_MODE", t.wandb.mode)
        os.environ.setdefault("WANDB_DIR", str(run_dir / "monitor"))

    torch.manual_seed(t.seed)  # the LoRA initialisation; full mode starts from the loaded weights
    unet = trainable_unet(cfg, model_dir)
    family = family_of(model_dir)
    attention = family.configure_attention(device)
    objective = family.objective(model_dir, t.prediction_type, t).to(device)
    prediction_type = objective.prediction_type
    scaling = latent_scaling(load_vae(model_dir))
    resumed, reshaped = checkpoints.resumed_progress(ckpt_dir, world.size)
    progress = resumed or {"step": 0, "epoch": 0, "position": 0, "prior_position": 0, "bad_steps": 0}
    stream = LatentStream(latent_dir, t.seed, world.size, world.rank, t.val_samples, t.skip_corrupt, t.micro_batch,
                          progress.get("origin"))
    prior_stream = open_prior(cfg, latent_dir, world, progress.get("prior_origin"))
    prior_count = cfg.data.prior.per_micro_batch(t.micro_batch) if prior_stream else 0

    universal = checkpoints.loads_as_universal(cfg, reshaped)
    engine, lr_sched = build_engine(cfg, unet, world.size, run_dir, device, stream.shapes, load_universal=universal)
    ema = TrainingEMAs(cfg, engine, world.rank, world.size)
    lora = t.mode == "lora"

    if resumed:
        checkpoints.load(engine, ckpt_dir, ema, world, lora, universal)
        if world.is_main:
            print(f"train: resumed from step {progress['step']}"
                  + (f" (written by {progress['origin']['world_size']} ranks, continued on {world.size})"
                     if reshaped else ""), flush=True)
    start_step = step = progress["step"]
    position, bad_steps = progress["position"], progress["bad_steps"]
    prior_position = progress.get("prior_position", 0)
    start_position = position

    log = JsonlLog(run_dir / "log.jsonl", world.is_main, start_step)
    prior = PriorPart(prior_stream, prior_position, prior_count, cfg.data.prior.loss_weight) if prior_stream else None
    batches = stream.batches(position, t.micro_batch - prior_count, pin=device.type == "cuda", prior=prior)
    nulls = tuple(None if n is None else n.to(device) for n in (stream.null_text, stream.null_pooled))
    global_batch = checkpoints.global_batch(cfg, world.size)
    engine.train()
    started = window_start = time.time()
    last_loss, grad_norm, saved_at, save_s = log.resumed_loss, None, -1, None
    bar = _progress_bar(world, start_step, t.steps)
    profiler = StepProfiler(t.profile_at, run_dir / "profile", world.is_main, start_step)
    while step < t.steps:
        losses, lr = [], lr_sched.get_last_lr()[0]  # the rate this step applies
        while len(losses) < t.grad_accum:
            with phase("data"):
                gen = step_generator(t.seed, position, world.rank, device, stream.origin_key)
                batch = next(batches)
                position = batch.pop("position")
                prior_position = batch.pop("prior_position", 0)
            with phase("forward"):
                loss = diffusion_loss(engine, objective, batch, nulls, cfg, scaling, family, gen, device, dtype)
            with phase("loss_check"):
                bad = world.any(not bool(torch.isfinite(loss)))
            if bad:
                # Skip this micro-batch on every rank before backward: no gradient, no DeepSpeed
                # counter, no optimizer state sees it. The step takes the next micro-batch instead.
                bad_steps += 1
                if world.is_main:
                    print(f"train: non-finite loss at step {step + 1}, skipped ({bad_steps} so far)", flush=True)
                if bad_steps > t.max_bad_steps:
                    raise TrainingDiverged(f"{bad_steps} micro-steps had a non-finite loss (train.max_bad_steps is "
                                           f"{t.max_bad_steps}), the last at step {step + 1}; lower train.lr, use "
                                           f"fp32/bf16, or check the latent cache")
                continue
            with phase("backward"):
                engine.backward(loss)
            boundary = len(losses) == t.grad_accum - 1  # this engine.step() updates the weights
            if boundary and (step + 1) % t.log_every == 0:
                grad_norm = _grad_norm_before_step(engine, cfg)
            if boundary:
                ema.fence()  # an offloaded EMA may still be reading the last step's masters
            with phase("optimizer_step"):
                engine.step()
            losses.append(loss.detach())
        step += 1
        with phase("ema"):
            ema.update(step)
        if ema.snapshot_due(step, t.steps):
            ema.snapshot(run_dir / "posthoc", step, world)
        profiler.step()

        if step % t.log_every == 0 or step == t.steps:
            last_loss = _mean_over_ranks(torch.stack(losses).mean())
            elapsed = time.time() - window_start
            record = {"step": step, "loss": last_loss, "lr": lr,
                      "grad_norm": _float(engine.get_global_grad_norm()) if grad_norm is None else grad_norm,
                      "images_per_s": round(global_batch * t.log_every / max(elapsed, 1e-9), 2),
                      "bad_steps": bad_steps, "epoch": round(stream.epochs_done(position), 3)}
            window_start, grad_norm = time.time(), None
            log.write(record)
            if world.is_main and engine.monitor.enabled:
                engine.monitor.write_events([(f"Train/{k}", v, step) for k, v in record.items()
                                             if k != "step" and v is not None])
            bar.set_postfix(loss=f"{last_loss:.4f}")
        bar.update(1)

        epoch = stream.epoch_and_offset(position)[0]
        progress = {"step": step, "epoch": epoch, "position": position, "prior_position": prior_position,
                    "bad_steps": bad_steps, "origin": stream.origin,
                    "prior_origin": prior_stream.origin if prior_stream else None}
        stopping = world.any(stop.signal is not None)
        if step % t.checkpoint_every == 0 or step == t.steps or stopping:
            save_started = time.time()
            checkpoints.save(engine, ckpt_dir, progress, ema, as_given, world, lora)
            saved_at, save_s = step, round(time.time() - save_started, 1)
        if stopping:
            if world.is_main:
                print(f"train: stop signal received; checkpoint saved at step {saved_at}, exiting "
                      f"{EXIT_PREEMPTED} (rerun to resume)", flush=True)
            bar.close()
            raise SystemExit(EXIT_PREEMPTED)
    bar.close()
    profiler.close()
    peak_gb = [round(max(column) / 2**30, 2) for column in zip(*world.gather(peak_gpu_memory(device)))]

    result = {"final_step": step, "final_loss": last_loss, "fingerprint": checkpoints.training_fingerprint(as_given),
              "world_size": world.size, "checkpoint": checkpoints.checkpoint_tag(step), "global_batch": global_batch,
              "mode": t.mode, "precision": t.precision, "zero_stage": t.zero_stage, "prediction_type": prediction_type,
              "attention": attention,
              "steps": t.steps, "steps_from": steps_why, "lr": t.lr, "lr_schedule": t.lr_schedule,
              "warmup_steps": t.warmup_steps, "micro_batch": t.micro_batch, "grad_accum": t.grad_accum,
              "bad_steps": bad_steps, "overflow_skipped_steps": int(engine.skipped_steps),
              "corrupt_shards_skipped": {k: v for part in world.gather(stream.corrupt) for k, v in part.items()},
              "epochs": round(stream.epochs_done(position), 3),
              "prior_per_micro_batch": prior_count or None, "bucketed": stream.bucketed, "bucket_left_out_per_epoch": _left_out(stream, world, start_position, position),
              "seconds_this_run": round(time.time() - started, 1), "last_checkpoint_s": save_s,
              "resumed_from": start_step, "compiled_graphs": _compiled_graphs() if t.compile else None,
              "peak_gpu_allocated_gb": peak_gb[0] if peak_gb else None,
              "peak_gpu_reserved_gb": peak_gb[1] if peak_gb else None, "digest": ema.digest(world, engine)}
    torch.distributed.barrier()
    if world.is_main:
        write_json(run_dir / "train.json", result)
        print(f"train: done at step {step}, loss {'-' if last_loss is None else f'{last_loss:.4f}'}", flush=True)
    return result


def open_prior(cfg: Config, latent_dir: Path, world: World, origin: dict | None = None) -> LatentStream | None:
    """The prior (class) images' stream when data.prior is set: the cache's prior/ folder."""
    if not cfg.data.prior.source:
        return None
    if not (latent_dir / "prior" / "manifest.json").is_file():
        raise ValueError(f"data.prior.source is set but latent cache {latent_dir} has no prior/: rerun the cache "
                         f"stage (snakemake --forcerun cache)")
    return LatentStream(latent_dir / "prior", cfg.train.seed, world.size, world.rank, 0, cfg.train.skip_corrupt,
                        origin=origin)


def _left_out(stream: LatentStream, world: World, start: int, end: int) -> dict[str, int] | None:
    """With buckets: per epoch this run read (the first 20), the samples that sat out as bucket
    remainders, summed over the ranks (a rank's epochs end at its own micro-batch counts); None
    without buckets."""
    if not stream.bucketed:
        return None
    first, last = stream.epoch_and_offset(start)[0], stream.epoch_and_offset(max(start, end - 1))[0]
    mine = {e: stream.left_out(e) for e in range(first, min(last, first + 19) + 1)}
    total: dict[int, int] = {}
    for part in world.gather(mine):
        for e, n in part.items():
            total[e] = total.get(e, 0) + n
    return {str(e): total[e] for e in sorted(total)}


def _grad_norm_before_step(engine, cfg: Config) -> float | None:
    """ZeRO-0 in fp32 clips without keeping the norm, so measure it from the reduced gradients."""
    if cfg.train.zero_stage != 0 or cfg.train.precision != "fp32":
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return _float(torch.nn.utils.get_total_norm(grads)) if grads else None


def _compiled_graphs() -> int:
    """Graphs Dynamo compiled in this process: with buckets, what tells one graph per shape from a
    recompile storm (or from shapes run eagerly past the recompile limit)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _mean_over_ranks(x: torch.Tensor) -> float:
    x = x.float().clone()
    torch.distributed.all_reduce(x)
    return float(x) / torch.distributed.get_world_size()


def _float(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _progress_bar(world: World, start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not world.is_main, desc="train", unit="step", file=sys.stdout,
                mininterval=5)


def preflight(cfg: Config, latent_dir: Path, model_dir: Path, data_dir: Path, run_dir: Path, nprocs: int) -> None:
    """Checked once, before any rank starts, so input errors are one clear line."""
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.precision fp16 needs a GPU: on the CPU its kernels are many times slower than fp32's; "
                         "use bf16 or fp32 here")
    if cfg.train.compile and not torch.cuda.is_available():
        raise ValueError("train.compile needs a GPU: torch's CPU Inductor gives part of the UNet zero gradients, "
                         "which would leave those weights untrained (bench/compile_grads.py shows it); set "
                         "train.compile false here")
    check_memory_cap(cfg.train.memory_cap_gb)
    check_card(cfg, family_of(model_dir), cfg.at_model_resolution(model_dir).cache.resolution,
               Hardware.this_process(cfg))
    check_cache(cfg, latent_dir, model_dir, data_dir)
    with_steps(cfg, latent_dir, nprocs)  # train.steps auto: the data set must give a step
    checkpointed_blocks(model_dir, cfg.train.gradient_checkpointing)
    check_zero_section(deepspeed_config(cfg, nprocs, run_dir))
    checkpoints.prepare_dir(cfg, run_dir / "checkpoints", nprocs)
    (run_dir / "train.json").unlink(missing_ok=True)


def import_rank_libraries() -> None:
    """The libraries every rank imports that the launcher has not (it has torch and DeepSpeed)."""
    import importlib

    for module in ("peft", "diffusers.models.unets.unet_2d_condition", "diffusers.models.autoencoders.autoencoder_kl"):
        importlib.import_module(module)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, cfg = stage_main("train", __doc__, argv, {"latents": "latent cache folder", "model": "model folder",
                                                      "data": "prepared data folder",
                                                      "run_dir": "run folder (results/runs/<run>)"},
                           {"preflight": "only check inputs and checkpoints for this many ranks, then exit"},
                           {"stop_with_parent": "save a checkpoint and exit 75 when the parent process (Snakemake) "
                                                "dies"})
    run_dir = Path(args.run_dir)
    cfg = resolve_here(cfg, Path(args.model))  # what is still auto (a stage run by hand, a Hub model)
    if args.preflight:  # before `srun` starts the ranks as tasks (several nodes): checks only
        preflight(cfg, Path(args.latents), Path(args.model), Path(args.data), run_dir, int(args.preflight))
        return
    if not launched():
        if args.stop_with_parent:
            stop_when_parent_dies()
        hold_run_lock(run_dir)  # before preflight, which deletes unfinished checkpoints
        nprocs = procs_wanted(cfg.train.procs)
        preflight(cfg, Path(args.latents), Path(args.model), Path(args.data), run_dir, nprocs)
        if nprocs > 1:
            if not torch.cuda.is_available():
                import_rank_libraries()  # once here, for the ranks forked from this process
            raise SystemExit(relaunch("workflow.train", argv, nprocs, forked_entry=lambda: run(lambda: main(argv))))
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        train(cfg, Path(args.latents), Path(args.model), run_dir)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_DIVERGED) from None
    except RanksMissing as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except checkpoints.CheckpointSaveError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_SAVE_FAILED) from None


if __name__ == "__main__":
    run(main)
