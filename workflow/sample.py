"""Stage `sample`: validation images and metrics from the merged model.

`sample.prompts` x `sample.seeds` -> one PNG each (`p<prompt>_s<seed>.png`), `grid.png` (prompts
as rows, seeds as columns, labelled) and `metrics.json` (with `digit_accuracy` when prompts name
handwritten digits). Each image has its own generator seeded by its seed, so the same config gives
the same images whatever the batch size.

    python -m workflow.sample --config config.yaml --model results/runs/digits-tiny/model \
        --out results/runs/digits-tiny/samples
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .cli import run, stage_main
from .config import Config
from .fsutil import atomic_dir, read_json, write_json
from .metrics import digit_accuracy
from .models import check_model_dir

LORA_FILE = "pytorch_lora_weights.safetensors"
MIN_CELL = 96  # small images are upscaled (nearest) in the grid so they can be seen


def load_pipeline(model_dir: Path, device: torch.device, base_model: Path | None = None):
    """The merged pipeline; for a LoRA-only merge (no fused model), the base model with the adapter."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    lora_only = not (model_dir / "model_index.json").is_file() and (model_dir / LORA_FILE).is_file()
    if lora_only:
        merged = read_json(model_dir / "merge.json", "merge record")
        base = Path(base_model or merged["base_model"])
        check_model_dir(base)
        pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.load_lora_weights(model_dir, weight_name=LORA_FILE)
        pipe.scheduler.register_to_config(prediction_type=merged["prediction_type"])
    else:
        check_model_dir(model_dir)
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(pipe, cfg: Config, device: torch.device) -> list[tuple[int, int, Image.Image]]:
    jobs = [(pi, seed) for pi in range(len(cfg.sample.prompts)) for seed in cfg.sample.seeds]
    out = []
    for start in range(0, len(jobs), cfg.sample.batch_size):
        chunk = jobs[start : start + cfg.sample.batch_size]
        gens = [torch.Generator(device).manual_seed(seed) for _, seed in chunk]
        images = pipe([cfg.sample.prompts[pi] for pi, _ in chunk], generator=gens, num_inference_steps=cfg.sample.steps,
                      guidance_scale=cfg.sample.guidance_scale).images
        out.extend((pi, seed, im) for (pi, seed), im in zip(chunk, images))
    return out


def make_grid(results: list[tuple[int, int, Image.Image]], prompts: list[str], seeds: list[int]) -> Image.Image:
    w, h = results[0][2].size
    scale = max(1, -(-MIN_CELL // min(w, h)))
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    label_w, header_h = 200, 20
    grid = Image.new("RGB", (label_w + cw * len(seeds), header_h + ch * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for col, seed in enumerate(seeds):
        draw.text((label_w + col * cw + 4, 4), f"seed {seed}", fill="black", font=font)
    for row, prompt in enumerate(prompts):
        text = prompt if len(prompt) <= 30 else prompt[:29] + "…"
        draw.text((4, header_h + row * ch + ch // 2 - 6), text, fill="black", font=font)
    for pi, seed, im in results:
        grid.paste(im.resize((cw, ch), Image.NEAREST), (label_w + seeds.index(seed) * cw, header_h + pi * ch))
    return grid


def sample(cfg: Config, model_dir: Path, out: Path, base_model: Path | None = None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    pipe = load_pipeline(model_dir, device, base_model)
    results = generate(pipe, cfg, device)
    metrics = {"images": len(results), "prompts": len(cfg.sample.prompts), "seeds": cfg.sample.seeds,
               "steps": cfg.sample.steps, "guidance_scale": cfg.sample.guidance_scale,
               "scheduler": type(pipe.scheduler).__name__, "model": str(model_dir)}
    digits = digit_accuracy([im for _, _, im in results], [cfg.sample.prompts[pi] for pi, _, _ in results])
    if digits:
        metrics |= digits
    metrics["seconds"] = round(time.time() - started, 1)
    with atomic_dir(out) as tmp:
        for pi, seed, im in results:
            im.save(tmp / f"p{pi:03d}_s{seed}.png")
        make_grid(results, cfg.sample.prompts, cfg.sample.seeds).save(tmp / "grid.png")
        write_json(tmp / "metrics.json", metrics)
    print(f"sample: {len(results)} images -> {out}; " + (f"digit_accuracy {metrics['digit_accuracy']:.3f}" if digits else ""))
    return metrics


def main(argv: list[str] | None = None) -> None:
    args, cfg = stage_main("sample", __doc__, argv, {"model": "merged model folder", "out": "output folder"},
                           {"base_model": "base model folder (for a LoRA-only merged model)"})
    sample(cfg, Path(args.model), Path(args.out), Path(args.base_model) if args.base_model else None)


if __name__ == "__main__":
    run(main)
