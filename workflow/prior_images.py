"""Stage `prior_images`: DreamBooth's class images, sampled from the base model.

With `data.prior.source: generate`, `data.prior.count` images are sampled from the base model with
`data.prior.caption` (image i with seed `data.prior.seed` + i, at the model's resolution, with the
run's sampling settings: sample.scheduler, steps, guidance_scale, negative_prompt), as DreamBooth
generates its class images before training. They are written as a prepared data set (shards of PNG
bytes, each captioned with the class caption, and manifest.json), which `cache` encodes beside the
data set's latents. The folder is per model, caption, count, seed and sampling settings, so another
run with the same ones reuses it.

    python -m workflow.prior_images --config config.yaml --model resources/models/sd15 \
        --out results/prior/sd15/a-photo-of-a-dog-n100-s0-1a2b3c4d
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch

from .auto import resolve_here
from .cli import run, stage_main
from .config import Config
from .fsutil import atomic_dir, write_json
from .gpu_memory import cap_gpu_memory
from .sample import generate, load_pipeline, set_scheduler
from .shards import write_shards
from .sources import Skipper, make_sample

SHARD_SIZE = 1000


def prior_images(cfg: Config, model_dir: Path, out: Path) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    cfg = resolve_here(cfg.at_model_resolution(model_dir), model_dir)
    prior = cfg.data.prior
    cfg = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"prompts": [prior.caption]})})
    if device.type == "cuda":
        cap_gpu_memory(device, cfg.train.memory_cap_gb)
    pipe = load_pipeline(model_dir, device)
    set_scheduler(pipe, cfg.sample.scheduler)
    size = (cfg.cache.resolution, cfg.cache.resolution)
    jobs = [(0, prior.seed + i, size) for i in range(prior.count)]
    images = generate(pipe, cfg, jobs, device)

    def samples():
        skip = Skipper(strict=True)
        for i, job in enumerate(jobs):
            buf = io.BytesIO()
            images[job].save(buf, format="PNG")
            yield make_sample(i, f"generated {i}", buf.getvalue(), "png", [prior.caption], {"seed": job[1]}, skip)

    with atomic_dir(out) as tmp:
        shards = write_shards(samples(), tmp, SHARD_SIZE)
        manifest = {"source": "generate", "count": prior.count, "shards": shards, "skipped": [],
                    "generated": {"model": str(model_dir), **cfg.prior_settings()},
                    "seconds": round(time.time() - started, 1)}
        write_json(tmp / "manifest.json", manifest)
    print(f"prior_images: {prior.count} images of {prior.caption!r} in {manifest['seconds']} s -> {out}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    args, cfg = stage_main("prior_images", __doc__, argv, {"model": "base model folder", "out": "output folder"})
    prior_images(cfg, Path(args.model), Path(args.out))


if __name__ == "__main__":
    run(main)
