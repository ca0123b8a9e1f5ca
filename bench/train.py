"""Benchmark the train stage against a plain-PyTorch loop, in the same run. Prints JSON.

    python bench/train.py                                  # GPU: SD 1.5 UNet, 512 px, the auto settings
    python bench/train.py --gpus 1,2,4                     # scaling: the stage on 1, 2 and 4 GPUs
    python bench/train.py --set train.micro_batch=1 --set train.offload_optimizer=cpu --no-baseline
    python bench/train.py --configfile config/cards/24gb.yaml --memory-cap-gb 24  # a 24 GB card's recipe
    python bench/train.py --model builtin:tiny --images 96 --resolution 32 --set train.micro_batch=4 \\
        --set train.compile=false --steps 6 --warmup 2 --log-every 2          # CPU smoke run

Steps: build the model (`builtin:sd15-arch` = SD 1.5's architecture, random weights: real shapes,
real cost), write synthetic JPEGs, run `prepare`, `fetch_model` and `cache` (the stages' own
functions), then time
  plain_pytorch: the same UNet, batch, precision (autocast), compile and memory-format settings in a
                 textbook loop: fused AdamW, clipping, no EMA, latents already on the GPU;
  train_stage:   `python -m workflow.train` itself (DeepSpeed engine, EMA, data streamed from the
                 latent shards by its prefetch thread, one rank per GPU), from its log.jsonl.
Steady state = the steps after `--warmup` (compilation, allocator warm-up). Peak memory is
torch.cuda.max_memory_allocated (and _reserved) of the busiest rank. --memory-cap-gb N caps the plain
loop and every rank of the stage (train.memory_cap_gb) at N GiB of PyTorch's allocator, so a recipe
that needs more runs out of memory as it would on that card (whose CUDA context, ~0.5 GB, the cap
does not count).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from bench_common import write_jpegs  # noqa: E402
from workflow.auto import Hardware, resolve  # noqa: E402
from workflow.cache import cache  # noqa: E402
from workflow.families import family_of, native_resolution  # noqa: E402
from workflow.config import Config, load_config_files  # noqa: E402
from workflow.distributed import die_with_parent  # noqa: E402
from workflow.engine import compile_forward, compiled_blocks  # noqa: E402
from workflow.fetch_model import fetch_model  # noqa: E402
from workflow.latents import LatentStream  # noqa: E402
from workflow.models import add_lora, checkpointed_blocks, latent_scaling, load_denoiser, load_vae  # noqa: E402
from workflow.prepare import prepare  # noqa: E402
from workflow.profiling import StepProfiler, phase  # noqa: E402
from workflow.gpu_memory import set_up_gpu_memory  # noqa: E402


def bench_config(args: argparse.Namespace, root: Path) -> Config:
    fixed = [f"model.pretrained={args.model}", f"data.source=imagefolder:{root / 'jpegs'}", "data.shard_size=256",
             f"cache.resolution={args.resolution}", f"train.steps={args.steps}", f"train.log_every={args.log_every}",
             f"train.checkpoint_every={10**6}", "train.val_samples=0", "train.warmup_steps=0"]
    layers = [REPO / "config.yaml", *(Path(name) for name in args.configfile if name)]
    return load_config_files(layers, fixed + args.set)


def build_inputs(cfg: Config, root: Path, images: int, aspects: list[float] | None = None,
                 timings: dict | None = None) -> tuple[Path, Path, Path]:
    """Prepared data, model folder and latent cache under `root` (kept between runs); photos of
    `cache.resolution`² pixels at each of `aspects` (width / height) in turn, or all (res+64) x res.
    `timings` gets the seconds of the stages run here and the cache's bytes per sample."""
    timings = {} if timings is None else timings
    data, model, latents = root / "data", root / "model", root / "latents"
    if not (root / "jpegs").is_dir():
        res = cfg.cache.resolution
        sizes = [(res + 64, res)] if not aspects else [(round(res * a ** 0.5 / 8) * 8, round(res / a ** 0.5 / 8) * 8)
                                                      for a in aspects]
        write_jpegs(root / "jpegs", images, sizes)
    if not (data / "manifest.json").is_file():
        prepare(cfg, data)
    if not (model / "model_index.json").is_file():
        started = time.time()
        fetch_model(cfg, model, data)
        timings["fetch_model_s"] = round(time.time() - started, 1)
    if not (latents / "manifest.json").is_file():
        started = time.time()
        cache(cfg, data, model, latents)
        timings["cache_s"] = round(time.time() - started, 1)
        shards = sum(f.stat().st_size for f in latents.glob("*.tar"))
        timings |= {"cache_images": images, "shard_bytes_per_sample": round(shards / images)}
    return data, model, latents


def plain_pytorch(cfg: Config, model_dir: Path, latent_dir: Path, steps: int, warmup: int, profile_dir: Path) -> dict:
    """The textbook loop on the same UNet: what the DeepSpeed step is held to."""
    t = cfg.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_up_gpu_memory(device, t)
    # the weights as the stage holds them: bf16 under precision bf16 (DeepSpeed keeps fp32 masters of the
    # trained ones; here AdamW steps bf16 weights, or fp32 LoRA adapters), else fp32 under autocast
    unet = load_denoiser(model_dir, torch.bfloat16 if t.precision == "bf16" else torch.float32).to(device)
    if t.mode == "lora":
        unet = add_lora(unet, t.lora)  # peft keeps the adapters in fp32
    family = family_of(model_dir)
    family.configure_attention(device)  # the stage's attention backends, so both loops run the same kernels
    family.set_checkpointing(unet, checkpointed_blocks(model_dir, t.gradient_checkpointing))
    stream = LatentStream(latent_dir, t.seed, micro_batch=t.micro_batch)
    if t.compile:
        compile_forward(unet, t.compile_shapes, stream.shapes, t.activation_memory_budget,
                        compiled_blocks(unet, t.compile_scope))
    unet.train()
    trained = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=t.lr, weight_decay=t.weight_decay, fused=device.type == "cuda")
    objective = family.objective(model_dir, t.prediction_type, t).to(device)  # the family's noising and target
    scale, shift = latent_scaling(load_vae(model_dir))
    stream = stream.batches(0, t.micro_batch)
    # 8 micro-batches cycled (with buckets: of several sizes, as the stage draws them)
    resident = [{k: v.to(device) for k, v in next(stream).items() if k != "position"} for _ in range(8)]
    amp = {"bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "fp16": torch.float16}.get(t.precision)

    def step(batch: dict) -> None:
        latents = (batch["mean"][:, 0].float() + batch["std"][:, 0].float() * torch.randn_like(batch["mean"][:, 0],
                                                                                             dtype=torch.float32))
        latents = (latents - shift) * scale
        noise = torch.randn_like(latents)
        ts = objective.random_timesteps(len(latents), None, device, tuple(latents.shape[1:]))
        noisy = objective.noisy(latents, noise, ts)
        with phase("forward"), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            pred = family.predict(unet, noisy, ts, batch["texts"][:, 0].float(),
                                  batch["pooled"][:, 0].float() if "pooled" in batch else None, batch["size"][:, 0],
                                  torch.float32, objective.guidance)
        loss = F.mse_loss(pred.float(), objective.target(latents, noise, ts))
        with phase("backward"):
            loss.backward()
        with phase("optimizer_step"):
            if t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trained, t.max_grad_norm, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    shutil.rmtree(profile_dir, ignore_errors=True)
    profiler = StepProfiler(t.profile_at, profile_dir, True, 0)
    warm_start = time.perf_counter()
    for i in range(warmup):
        step(resident[i % len(resident)])
        profiler.step()
    profiler.close()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    warmup_s = start - warm_start  # includes compilation
    for i in range(steps - warmup):
        step(resident[i % len(resident)])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"img_s": round(t.micro_batch * (steps - warmup) / seconds, 2), "warmup_s": round(warmup_s, 1),
              "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
              "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None}
    if t.compile:
        from torch._dynamo.utils import counters

        result["compiled_graphs"] = counters["stats"]["unique_graphs"]
    if (profile_dir / "summary.json").is_file():
        result["profile"] = profile_summary(profile_dir)
    unet = opt = resident = None  # the closure in step() holds them too: free the GPU memory before the stage runs
    if cuda:
        torch.cuda.empty_cache()
    return result


def profile_summary(folder: Path, top: int = 8) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    return summary | {"top_gpu": summary["top_gpu"][:top], "top_host": summary["top_host"][:top]}


def train_stage(cfg: Config, data: Path, model: Path, latents: Path, run_dir: Path, gpus: int, warmup: int) -> dict:
    """`python -m workflow.train` on `gpus` GPUs; steady-state img/s from its log.jsonl."""
    shutil.rmtree(run_dir, ignore_errors=True)
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus))), "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "workflow.train", "--config", cfg.model_dump_json(), "--latents", str(latents),
           "--model", str(model), "--data", str(data), "--run-dir", str(run_dir)]
    started = time.time()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    stage_log = run_dir.with_name(run_dir.name + ".log")  # outside the run folder, kept: read it when cut short
    with open(stage_log, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=die_with_parent)  # a killed bench leaves no rank holding the GPU
    if proc.returncode != 0:
        raise SystemExit(f"train stage failed ({proc.returncode}), its output in {stage_log}:\n"
                         f"{stage_log.read_text()[-6000:]}")
    result = json.loads((run_dir / "train.json").read_text())
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > warmup]
    if not timed:
        raise SystemExit(f"no log records after step {warmup}: raise --steps or lower --warmup/--log-every")
    images = seconds = 0.0
    previous = warmup
    for r in timed:
        n = result["global_batch"] * (r["step"] - previous)
        images, seconds, previous = images + n, seconds + n / r["images_per_s"], r["step"]
    profile = None
    if (run_dir / "profile" / "summary.json").is_file():
        profile = profile_summary(run_dir / "profile")
        kept = run_dir.with_name(run_dir.name + "-profile")  # the full op tables, beside the stage's log
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(run_dir / "profile", kept)
    shutil.rmtree(run_dir, ignore_errors=True)  # a full fine-tune's checkpoint is ~15 GB
    first = records[0]  # its window holds the compilation
    return {"gpus": gpus, "img_s": round(images / seconds, 2), "img_s_per_gpu": round(images / seconds / gpus, 2),
            **{k: result[k] for k in ("precision", "zero_stage", "micro_batch", "lr")},
            "first_window_s": round(result["global_batch"] * first["step"] / first["images_per_s"], 1),
            "checkpoint_s": result["last_checkpoint_s"], "compiled_graphs": result.get("compiled_graphs"),
            "peak_allocated_gb": result["peak_gpu_allocated_gb"], "peak_reserved_gb": result["peak_gpu_reserved_gb"],
            "final_loss": result["final_loss"], "attention": result.get("attention"),
            "wall_s": round(time.time() - started, 1), "profile": profile}


def progress(what: str, value) -> None:
    """A line on stderr as each part finishes, so a run cut short still shows what it measured."""
    print(f"bench: {what} {json.dumps(value)}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configfile", nargs="+", default=[],
                    help="laid over config.yaml in this order, e.g. config/cards/24gb.yaml; none: the auto settings")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. train.zero_stage=2")
    ap.add_argument("--model", default="builtin:sd15-arch")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--gpus", default="1", help="comma-separated GPU counts for the train stage")
    ap.add_argument("--aspects", default="", help="photo aspect ratios W:H in turn, e.g. 3:2,2:3,1:1 (with --set "
                    "cache.buckets=auto: a bucketed run); default: all (resolution+64) x resolution")
    ap.add_argument("--memory-cap-gb", type=float, default=None, help="GiB of GPU memory each process may use "
                    "(train.memory_cap_gb), the plain loop's too: a smaller card's recipe on a big GPU")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--workdir", default=None, help="kept between runs (model, data, latents)")
    ap.add_argument("--label", default="")
    ap.add_argument("--profile", action="store_true", help="profile 3 warm-up steps of each loop (train.profile_at)")
    args = ap.parse_args()
    if args.warmup % args.log_every:
        ap.error("--warmup must be a multiple of --log-every")
    if args.profile:
        if args.warmup < 6:
            ap.error("--profile needs --warmup 6 or more (3 profiled steps after the first ones)")
        args.set.append(f"train.profile_at={args.warmup - 4}")
    if args.memory_cap_gb:
        args.set.append(f"train.memory_cap_gb={args.memory_cap_gb}")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-train-"))
    root.mkdir(parents=True, exist_ok=True)
    given = bench_config(args, root)  # `auto` left for each stage to resolve for its own GPUs
    started = time.time()
    aspects = [float(a.split(":")[0]) / float(a.split(":")[1]) for a in args.aspects.split(",")] if args.aspects else None
    timings: dict = {}
    data, model, latents = build_inputs(given, root, args.images, aspects, timings)
    cfg = resolve(given, Hardware(1, torch.cuda.is_available(), None, "one GPU"), family_of(model),
                  native_resolution(model))[0]  # what one rank (and the plain loop) runs
    if torch.cuda.is_available():  # the cache stage's VAE left ~38 GB in this process's allocator: the
        torch.cuda.empty_cache()   # train stage's process (micro-batch 64) ran out of memory beside it on an H100
    setup_s = round(time.time() - started, 1)
    progress("setup", {"setup_s": setup_s, **timings})
    # A full fine-tune's checkpoint is ~15 GB: written to memory where there is room, it costs less. Not
    # when the optimizer lives in host memory already: SDXL's CPU-offloaded full fine-tune on a 128 GiB
    # host was killed by the OOM killer (122 GiB used) writing its checkpoint to /dev/shm.
    shm = Path("/dev/shm")
    in_memory = (shm.is_dir() and shutil.disk_usage(shm).free > 64 * 2**30 and cfg.train.offload_optimizer == "none")
    runs_root = shm / "bench-train-runs" if in_memory else root
    gpu_counts = [int(g) for g in args.gpus.split(",")]
    result = {"bench": "train", "label": args.label,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
              "model": args.model, "resolution": args.resolution, "overrides": args.set, "aspects": args.aspects,
              "train": {k: getattr(cfg.train, k) for k in ("micro_batch", "grad_accum", "precision", "zero_stage",
                                                             "offload_optimizer", "offload_optimizer_ratio", "compile", "compile_scope", "compile_shapes",
                                                             "activation_memory_budget",
                                                             "gradient_checkpointing", "mode", "memory_cap_gb",
                                                             "expandable_segments")},
              "ema": {"decay": cfg.ema.decay, "offload": cfg.ema.offload}, "steps": args.steps, "warmup": args.warmup, "setup_s": setup_s, "setup": timings}
    if not args.no_baseline:
        result["plain_pytorch"] = plain_pytorch(cfg, model, latents, args.steps, args.warmup,
                                                 root / "profile-plain")
        progress("plain_pytorch", result["plain_pytorch"])
    runs = []
    for g in gpu_counts:
        run_name = f"run-{args.label}-{g}gpu" if args.label else f"run-{g}gpu"  # benches side by side: one folder each
        runs.append(train_stage(given, data, model, latents, runs_root / run_name, g, args.warmup))
        progress("train_stage", runs[-1])
    result["train_stage"] = runs
    if not args.no_baseline:
        result["ratio_to_plain"] = round(runs[0]["img_s_per_gpu"] / result["plain_pytorch"]["img_s"], 3)
    one = next((r for r in runs if r["gpus"] == 1), None)
    if one:
        result["scaling"] = {str(r["gpus"]): round(r["img_s"] / (r["gpus"] * one["img_s"]), 3) for r in runs}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
