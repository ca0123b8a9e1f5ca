"""Stage `train`: DeepSpeed training of the UNet from cached latents.

Read top to bottom: load the UNet and noise schedule, build the DeepSpeed engine from the project
config, resume from the newest complete checkpoint if there is one, then for each optimizer step:
micro-batches -> loss -> engine.backward/step -> EMA -> log -> checkpoint.

    python -m workflow.train --config config.yaml --latents results/latents/digits/tiny-digits_32px \
        --model resources/models/tiny-digits --data results/data/digits --run-dir results/runs/digits-tiny

Started once, it launches `train.procs` ranks (CPU, gloo) or one per GPU; every rank saves.
Checkpoints go to <run-dir>/checkpoints/ (not a declared output, so a rerun resumes), and
<run-dir>/train.json is written when training finished.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .cache import cache_fingerprint, fingerprint_mismatch
from .cli import run, stage_main
from .config import Config
from .distributed import World, device_for, init_world, launched, procs_wanted, relaunch
from .ema import EMA
from .fsutil import atomic_file, read_json, sha256_json, write_json
from .latents import LatentStream
from .models import latent_scaling, load_noise_scheduler, load_unet, load_vae

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(cfg: Config, world_size: int, run_dir: Path) -> dict[str, Any]:
    """The DeepSpeed config, generated from the project config (the only place it is built)."""
    t = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW as client optimizer (fused on GPU)
        "steps_per_print": 10**9,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "csv_monitor": {"enabled": True, "output_path": str(run_dir / "monitor"), "job_name": "train"},
        "tensorboard": {"enabled": True, "output_path": str(run_dir / "monitor"), "job_name": "train"},
    }
    return ds


def training_fingerprint(cfg: Config) -> str:
    """What a checkpoint must share with the config to be resumed (not steps or checkpoint cadence)."""
    t = cfg.train.model_dump(exclude={"steps", "checkpoint_every", "log_every"})
    cache = cfg.cache.model_dump(exclude={"procs", "batch_size"})  # how latents were computed, not what they are
    return sha256_json({"train": t, "ema_decay": cfg.ema.decay, "model": cfg.model.model_dump(), "cache": cache})


def lr_lambda(cfg: Config):
    warmup = cfg.train.warmup_steps
    return lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """Randomness (noise, timesteps, caption choice) as a pure function of where we are: resuming
    at step k draws exactly what an uninterrupted run draws at step k."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, np.uint64)[0] >> 1))
    return g


def diffusion_loss(engine, scheduler, batch: dict, null_text: torch.Tensor, cfg: Config, scaling: tuple[float, float],
                   gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    n, variants = batch["mean"].shape[:2]
    # The per-sample choices (flip variant, caption, dropout) are drawn on the device generator and
    # brought to the host in one transfer: one sync per micro-step, not one per sample.
    u = torch.rand(n, 3, generator=gen, device=device).cpu()
    rows = torch.arange(n)
    variant = (u[:, 0] * variants).long()  # cached flips: original or flipped latent, half each
    mean = batch["mean"][rows, variant].to(device)
    std = batch["std"][rows, variant].to(device)
    # Latents are drawn from the cached VAE posterior every step, then put in the UNet's space.
    latents = mean + std * torch.randn(mean.shape, generator=gen, device=device)
    scale, shift = scaling
    latents = (latents - shift) * scale
    # One caption per sample (any of its captions); some replaced by the null caption for CFG.
    texts = [null_text if u[i, 2] < cfg.train.caption_dropout else options[int(u[i, 1] * len(options))]
             for i, options in enumerate(batch["texts"])]
    text = torch.stack(texts).to(device)

    noise = torch.randn(latents.shape, generator=gen, device=device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen, device=device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    pred = engine(noisy.to(dtype), timesteps, encoder_hidden_states=text.to(dtype)).sample
    return F.mse_loss(pred.float(), target.float())


class JsonlLog:
    def __init__(self, path: Path, enabled: bool):
        self.file = open(path, "a") if enabled else None

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


def checkpoint_tag(step: int) -> str:
    return f"step{step:08d}"


def latest_checkpoint(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def save_checkpoint(engine, ckpt_dir: Path, step: int, ema: EMA, fingerprint: str, world: World, keep: int = 2) -> None:
    """Every rank calls this and writes its part. `latest` is pointed at the new tag only after all
    ranks have finished (barrier), so a checkpoint cut short by a kill is never resumed."""
    tag = checkpoint_tag(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False,
                           client_state={"step": step, "ema": ema.state_dict(), "fingerprint": fingerprint})
    torch.distributed.barrier()
    if world.is_main:
        # A small readable record, so the launcher can check a resume before starting any rank.
        write_json(ckpt_dir / tag / "meta.json", {"step": step, "fingerprint": fingerprint})
        with atomic_file(ckpt_dir / "latest") as f:
            f.write(tag)
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def check_resumable(cfg: Config, ckpt_dir: Path) -> None:
    tag = latest_checkpoint(ckpt_dir)
    if tag and read_json(ckpt_dir / tag / "meta.json", "checkpoint record")["fingerprint"] != training_fingerprint(cfg):
        raise ValueError(f"checkpoint {ckpt_dir / tag} was made with different training settings; "
                         f"delete {ckpt_dir} to start fresh, or use a new run name")


def check_cache(cfg: Config, latent_dir: Path, model_dir: Path, data_dir: Path) -> None:
    """Refuse latents made from another model, data set or caching policy, naming what differs."""
    manifest = read_json(latent_dir / "manifest.json", "latent cache manifest")
    differs = fingerprint_mismatch(cache_fingerprint(cfg, model_dir, data_dir), manifest.get("fingerprint", {}))
    if differs:
        raise ValueError(f"latent cache {latent_dir} does not match this config: {', '.join(differs)} differ(s); "
                         f"rerun the cache stage (snakemake --forcerun cache)")


def train(cfg: Config, latent_dir: Path, model_dir: Path, data_dir: Path, run_dir: Path) -> dict[str, Any] | None:
    import deepspeed

    world = init_world()
    device = device_for(world)
    dtype = PRECISION_DTYPES[cfg.train.precision]
    ckpt_dir = run_dir / "checkpoints"
    if world.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "monitor").mkdir(exist_ok=True)

    torch.manual_seed(cfg.train.seed)
    unet = load_unet(model_dir)
    scheduler = load_noise_scheduler(model_dir)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    scaling = latent_scaling(load_vae(model_dir))
    stream = LatentStream(latent_dir, cfg.train.seed)
    null_text = stream.null_text  # stays on the host, beside the cached caption embeddings it replaces

    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr, weight_decay=1e-2, fused=device.type == "cuda")
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=unet, optimizer=optimizer, lr_scheduler=lr_sched,
                                           config=deepspeed_config(cfg, world.size, run_dir))
    ema = EMA(engine.module.named_parameters(), cfg.ema.decay)
    fingerprint = training_fingerprint(cfg)

    start_step = 0
    if latest_checkpoint(ckpt_dir):
        _, client = engine.load_checkpoint(str(ckpt_dir))
        start_step = client["step"]
        ema.load_state_dict(client["ema"])
        if world.is_main:
            print(f"train: resumed from step {start_step}", flush=True)

    log = JsonlLog(run_dir / "log.jsonl", world.is_main)
    batches = stream.batches(start_step, cfg.train.micro_batch, world.size, world.rank, cfg.train.grad_accum)
    global_batch = cfg.train.micro_batch * cfg.train.grad_accum * world.size
    engine.train()
    started, window_start, last_loss = time.time(), time.time(), float("nan")
    step = start_step
    progress = _progress(world, start_step, cfg.train.steps)
    while step < cfg.train.steps:
        losses = []
        for micro in range(cfg.train.grad_accum):
            gen = step_generator(cfg.train.seed, step, micro, world.rank, device)
            loss = diffusion_loss(engine, scheduler, next(batches), null_text, cfg, scaling, gen, device, dtype)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
        step += 1
        ema.update(engine.module.named_parameters(), step)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            last_loss = _mean_over_ranks(torch.stack(losses).mean())
            elapsed = time.time() - window_start
            record = {"step": step, "loss": last_loss, "lr": lr_sched.get_last_lr()[0],
                      "grad_norm": _float(engine.get_global_grad_norm()),
                      "images_per_s": round(global_batch * cfg.train.log_every / max(elapsed, 1e-9), 2)}
            window_start = time.time()
            log.write(record)
            if world.is_main and engine.monitor.enabled:
                engine.monitor.write_events([(f"Train/{k}", v, step) for k, v in record.items()
                                             if k != "step" and v is not None])
            progress.set_postfix(loss=f"{last_loss:.4f}")
        progress.update(1)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            save_checkpoint(engine, ckpt_dir, step, ema, fingerprint, world)
    progress.close()

    result = {"final_step": step, "final_loss": last_loss, "fingerprint": fingerprint, "world_size": world.size,
              "checkpoint": checkpoint_tag(step), "global_batch": global_batch, "precision": cfg.train.precision,
              "zero_stage": cfg.train.zero_stage, "seconds_this_run": round(time.time() - started, 1),
              "resumed_from": start_step}
    torch.distributed.barrier()
    if world.is_main:
        write_json(run_dir / "train.json", result)
        print(f"train: done at step {step}, loss {last_loss:.4f}", flush=True)
    return result


def _mean_over_ranks(x: torch.Tensor) -> float:
    x = x.float().clone()
    torch.distributed.all_reduce(x)
    return float(x) / torch.distributed.get_world_size()


def _float(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _progress(world: World, start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not world.is_main, desc="train", unit="step", file=sys.stdout,
                mininterval=5)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, cfg = stage_main("train", __doc__, argv, {"latents": "latent cache folder", "model": "model folder", "data": "prepared data folder",
                                                      "run_dir": "run folder (results/runs/<run>)"})
    run_dir = Path(args.run_dir)
    if not launched():  # checked once, before any rank starts, so errors are one clear line
        check_cache(cfg, Path(args.latents), Path(args.model), Path(args.data))
        check_resumable(cfg, run_dir / "checkpoints")
        (run_dir / "train.json").unlink(missing_ok=True)
        nprocs = procs_wanted(cfg.train.procs)
        if nprocs > 1:
            raise SystemExit(relaunch("workflow.train", argv, nprocs))
    run_dir.mkdir(parents=True, exist_ok=True)
    train(cfg, Path(args.latents), Path(args.model), Path(args.data), run_dir)


if __name__ == "__main__":
    run(main)
