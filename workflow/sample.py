"""Stage `sample`: validation images and numbers from the merged model.

`sample.prompts` x `sample.seeds` -> one PNG each (`p<prompt>_s<seed>.png`), `grid.png` (prompts as
rows, seeds as columns, labelled; with `sample.compare_base` the base model's images beside them),
with `sample.checkpoints` a `checkpoints.png` (checkpoint x prompt, first seed) sampled from the
training checkpoints, and `metrics.json`: validation loss on the held-out latents (per checkpoint
too), `digit_accuracy` when prompts name handwritten digits, and a CLIP score when
`sample.clip_model` is a local CLIP folder. Each image has its own generator seeded by its seed, so
the same config gives the same images (and another batch size the same up to kernel rounding).

    python -m workflow.sample --config config.yaml --model results/runs/digits-tiny/model \
        --base-model resources/models/tiny-digits --latents results/latents/digits/tiny-digits_32px \
        --run-dir results/runs/digits-tiny --out results/runs/digits-tiny/samples
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .auto import resolve_here
from .checkpoints import checkpoint_tag
from .cli import run, stage_main
from .config import AUTO, DIGIT_PROMPTS, Config
from .fsutil import atomic_dir, read_json, write_json
from .gpu_memory import cap_gpu_memory, peak_gpu_memory
from .latents import decode_latent_sample, read_verified_shard, validation_samples
from .metrics import clip_score, clip_spread, clip_unusable, digit_accuracy, digit_spread, validation_loss
from .families import family_of, family_of_pipeline
from .models import check_model_dir, latent_scaling, load_pipeline as load_family_pipeline

LORA_FILE = "pytorch_lora_weights.safetensors"
MIN_CELL = 96  # small images are upscaled (nearest) in the grid so they can be seen


def load_pipeline(model_dir: Path, device: torch.device, base_model: Path | None = None):
    """The merged pipeline; for a LoRA-only merge (no fused model), the base model with the adapter."""
    lora_only = not (model_dir / "model_index.json").is_file() and (model_dir / LORA_FILE).is_file()
    folder = Path(base_model or read_json(model_dir / "merge.json", "merge record")["base_model"]) if lora_only else model_dir
    check_model_dir(folder)
    dtype = family_of(folder).inference_dtype(device)
    # Validation images are judged unfiltered: the safety checker would black some out.
    pipe = load_family_pipeline(folder, dtype, unfiltered=True)
    if lora_only:
        pipe.load_lora_weights(model_dir, weight_name=LORA_FILE)
        prediction_type = read_json(model_dir / "merge.json")["prediction_type"]
        if "prediction_type" in pipe.scheduler.config:  # a DDPM schedule (a flow-matching one has none)
            pipe.scheduler.register_to_config(prediction_type=prediction_type)
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        pipe.vae.enable_slicing()  # decode a batch one image at a time: the VAE's peak is per image, not per batch
    return pipe.to(device)


def set_scheduler(pipe, name: str) -> None:
    """sample.scheduler, as the pipeline's family builds it from the model's own schedule."""
    family_of_pipeline(pipe).set_sampler(pipe, name)


Job = tuple[int, int, tuple[int, int]]  # (prompt index, seed, (width, height))


def generate(pipe, cfg: Config, jobs: list[Job], device: torch.device) -> dict[Job, Image.Image]:
    """Images for (prompt index, seed, size) jobs, batched per size; each with a generator of its
    own seed. SDXL pipelines condition on the size too (original = target size, no crop)."""
    s = cfg.sample
    family = family_of_pipeline(pipe)
    out = {}
    for size in dict.fromkeys(job[2] for job in jobs):
        of_size = [job for job in jobs if job[2] == size]
        for start in range(0, len(of_size), s.batch_size):
            chunk = of_size[start : start + s.batch_size]
            images = pipe([s.prompts[pi] for pi, _, _ in chunk],
                          generator=[torch.Generator(device).manual_seed(seed) for _, seed, _ in chunk],
                          num_inference_steps=s.steps, width=size[0], height=size[1],
                          **family.sample_kwargs(pipe, s, len(chunk))).images
            out.update(zip(chunk, images))
    return out


def image_name(job: Job, several_sizes: bool) -> str:
    pi, seed, (w, h) = job
    return f"p{pi:03d}_s{seed}" + (f"_{w}x{h}" if several_sizes else "") + ".png"


def make_grid(rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """Images in rows and columns, labelled on the left and on top; images of other sizes (aspect
    ratios) are centered in cells of the largest size."""
    w = max(im.size[0] for row in rows for im in row)
    h = max(im.size[1] for row in rows for im in row)
    scale = max(1, -(-MIN_CELL // min(min(im.size) for row in rows for im in row)))
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    label_w, header_h = 200, 20
    grid = Image.new("RGB", (label_w + cw * len(col_labels), header_h + ch * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for col, label in enumerate(col_labels):
        draw.text((label_w + col * cw + 4, 4), label[: max(4, cw // 6)], fill="black", font=font)
    for r, (label, images) in enumerate(zip(row_labels, rows)):
        draw.text((4, header_h + r * ch + ch // 2 - 6), label if len(label) <= 30 else label[:29] + "…",
                  fill="black", font=font)
        for c, im in enumerate(images):
            iw, ih = im.size[0] * scale, im.size[1] * scale
            grid.paste(im.resize((iw, ih), Image.NEAREST),
                       (label_w + c * cw + (cw - iw) // 2, header_h + r * ch + (ch - ih) // 2))
    return grid


class Validator:
    """Validation loss of a denoiser on the held-out latents (the same samples, timesteps and noise)."""

    def __init__(self, cfg: Config, latent_dir: Path | None, base_model: Path | None, prediction_type: str):
        from .models import load_vae

        self.samples = validation_samples(latent_dir, cfg.train.val_samples) if latent_dir and base_model else []
        self.cfg, self.prediction_type = cfg, prediction_type
        self.skipped = None if self.samples else (
            "no latent cache given (--latents, --base-model)" if not (latent_dir and base_model) else
            f"no samples held out: train.val_samples={cfg.train.val_samples} for "
            f"{read_json(Path(latent_dir) / 'manifest.json')['count']} cached samples (auto holds out none below 100)")
        if self.samples:
            self.family = family_of(base_model)
            self.objective = self.family.objective(base_model, prediction_type, cfg.train)
            self.scaling = latent_scaling(load_vae(base_model))

    def __call__(self, pipe, device: torch.device) -> float | None:
        """The validation loss of the pipeline's denoiser (its UNet for SD 1.x/2.x/SDXL)."""
        if not self.samples:
            return None
        return validation_loss(getattr(pipe, self.family.denoiser), self.objective, self.family, self.samples,
                               self.scaling, self.cfg.sample.val_timesteps, device)


MAX_AUTO_PROMPTS = 8
DIGIT_SOURCES = ("builtin:digits", "builtin:digits-aspect")


def reference_samples(cfg: Config, latent_dir: Path, count: int) -> list[dict]:
    """Cached samples whose captions can prompt: the held-out ones, else (a small data set holds none
    out) the first training samples."""
    held = validation_samples(latent_dir, cfg.train.val_samples)
    if held:
        return held
    manifest = read_json(latent_dir / "manifest.json", "latent cache manifest")
    out: list[dict] = []
    for shard in manifest["shards"]:
        out += [decode_latent_sample(raw) for raw in read_verified_shard(latent_dir, shard)[: count - len(out)]]
        if len(out) >= count:
            break
    return out


def resolve_prompts(cfg: Config, latent_dir: Path | None) -> tuple[Config, dict[int, dict]]:
    """sample.prompts auto: the ten digits for the digits data sets; else the distinct captions of up to
    8 reference samples (each prompt's sample kept, to show its image beside the generated ones), and
    DreamBooth's class caption (data.prior.caption: does the class still draw the class?)."""
    if cfg.sample.prompts != AUTO:
        return cfg, {}
    references: dict[int, dict] = {}
    if cfg.data.source in DIGIT_SOURCES:
        prompts = list(DIGIT_PROMPTS)
    else:
        if latent_dir is None:
            raise ValueError("sample.prompts auto takes the captions from the latent cache: pass --latents, or set "
                             "sample.prompts")
        prompts = []
        for sample in reference_samples(cfg, latent_dir, 4 * MAX_AUTO_PROMPTS):
            caption = sample["meta"]["captions"][0]
            if caption not in prompts and len(prompts) < MAX_AUTO_PROMPTS:
                references[len(prompts)] = sample
                prompts.append(caption)
        prior = cfg.data.prior
        if prior.source and prior.caption and prior.caption not in prompts:
            prompts.append(prior.caption)
    sample_cfg = cfg.sample.model_copy(update={"prompts": prompts})
    return cfg.model_copy(update={"sample": sample_cfg}), references


@torch.no_grad()
def reference_image(pipe, sample: dict) -> Image.Image:
    """A cached sample decoded by the VAE: the real image as training saw it (resized and cropped)."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)  # SDXL's VAE overflows in fp16
    dtype = torch.float32 if upcast else vae.dtype
    mean = sample["mean"][0:1].to(vae.device, dtype)  # variant 0: the unflipped image
    pixels = vae.to(dtype).decode(mean).sample
    vae.to(torch.float16 if upcast else dtype)  # upcast only ever comes from fp16
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def digit_scores(images: list[Image.Image], prompts: list[str], prompt_digits: dict[str, int] | None) -> dict:
    """Whether the images draw the digits asked for, and how varied they are (workflow/metrics.py)."""
    return (digit_accuracy(images, prompts, prompt_digits) or {}) | (digit_spread(images, prompts, prompt_digits) or {})


REAL_IMAGES = 64  # the real images CLIP's spread compares with, where the data set holds none out


def real_images(pipe, cfg: Config, latent_dir: Path | None) -> tuple[list[Image.Image], list[str]]:
    """The cache's real images, decoded as training saw them, and their captions (the held-out ones;
    else the first training images)."""
    if latent_dir is None or clip_unusable(cfg.sample.clip_model):
        return [], []
    samples = reference_samples(cfg, latent_dir, REAL_IMAGES)
    return [reference_image(pipe, sample) for sample in samples], [sample["meta"]["captions"][0] for sample in samples]


def scores_digits(cfg: Config) -> bool:
    """digit_accuracy is computed where the data are digits (or a prompt is given a digit to draw)."""
    digits = (*DIGIT_SOURCES, "builtin:sevens")
    return bool(cfg.sample.prompt_digits) or cfg.data.source in digits or cfg.data.prior.source in digits


def sample(cfg: Config, model_dir: Path, out: Path, base_model: Path | None = None, latent_dir: Path | None = None,
           run_dir: Path | None = None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    folder = model_dir if (model_dir / "model_index.json").is_file() else base_model  # else a LoRA-only merge
    cfg = resolve_here(cfg.at_model_resolution(folder), folder)
    cfg, references = resolve_prompts(cfg, latent_dir)
    s = cfg.sample
    if device.type == "cuda":
        cap_gpu_memory(device, cfg.train.memory_cap_gb)  # a card recipe's memory, as in training
        torch.cuda.reset_peak_memory_stats(device)
    pipe = load_pipeline(model_dir, device, base_model)
    set_scheduler(pipe, s.scheduler)
    sizes = s.sizes(cfg.cache.resolution)
    jobs = [(pi, seed, size) for pi in range(len(s.prompts)) for size in sizes for seed in s.seeds]
    images = generate(pipe, cfg, jobs, device)
    peak = peak_gpu_memory(device)
    validate = Validator(cfg, latent_dir, base_model, pipe.scheduler.config.get("prediction_type"))
    metrics = {"images": len(images), "prompts": len(s.prompts), "seeds": s.seeds, "steps": s.steps,
               "guidance_scale": s.guidance_scale, "negative_prompt": s.negative_prompt,
               "scheduler": type(pipe.scheduler).__name__, "sizes": [f"{w}x{h}" for w, h in sizes],
               "model": str(model_dir), "val_loss": validate(pipe, device), "val_samples": len(validate.samples),
               "val_timesteps": s.val_timesteps, "prompt_list": s.prompts, "batch_size": s.batch_size,
               "peak_gpu_allocated_gb": round(peak[0] / 2**30, 2) if peak else None,
               "peak_gpu_reserved_gb": round(peak[1] / 2**30, 2) if peak else None,
               "memory_cap_gb": cfg.train.memory_cap_gb if device.type == "cuda" else None}
    if metrics["val_loss"] is None:
        metrics["val_loss_skipped"] = validate.skipped
    prompts = [s.prompts[pi] for pi, _, _ in jobs]
    if scores_digits(cfg):
        metrics |= digit_scores([images[j] for j in jobs], prompts, s.prompt_digits)
    else:
        metrics["digit_accuracy_skipped"] = f"the data ({cfg.data.source}) are not digits"
    if len(sizes) > 1 and scores_digits(cfg):
        metrics["digit_accuracy_per_size"] = {
            f"{w}x{h}": (digit_accuracy([images[j] for j in jobs if j[2] == (w, h)],
                                        [s.prompts[j[0]] for j in jobs if j[2] == (w, h)], s.prompt_digits)
                         or {}).get("digit_accuracy")
            for w, h in sizes}
    metrics |= clip_score([images[j] for j in jobs], prompts, s.clip_model, device)
    real, real_captions = real_images(pipe, cfg, latent_dir)
    metrics |= clip_spread([images[j] for j in jobs], prompts, real, real_captions, s.clip_model, device)
    row_jobs = [[j for j in jobs if j[0] == pi] for pi in range(len(s.prompts))]  # sizes x seeds, in order
    rows = [[images[j] for j in row] for row in row_jobs]
    columns = [f"seed {seed}" + (f" {w}x{h}" if len(sizes) > 1 else "") for _, seed, (w, h) in row_jobs[0]]
    if references:  # each caption's own image first, so the samples sit beside the real one
        real = {pi: reference_image(pipe, sample) for pi, sample in references.items()}
        blank = Image.new("RGB", rows[0][0].size, "white")
        rows = [[real.get(pi, blank)] + row for pi, row in enumerate(rows)]
        columns = ["real"] + columns
        metrics["reference_images"] = len(real)

    base_images = {}
    if s.compare_base:
        base = load_pipeline(base_model, device)
        set_scheduler(base, s.scheduler)
        base_images = generate(base, cfg, jobs, device)
        metrics["base"] = {"val_loss": validate(base, device)}
        if scores_digits(cfg):
            metrics["base"] |= digit_scores([base_images[j] for j in jobs], prompts, s.prompt_digits)
        if not clip_unusable(s.clip_model):
            metrics["base"] |= clip_spread([base_images[j] for j in jobs], prompts, real, real_captions, s.clip_model,
                                           device)
        rows = [row + [base_images[j] for j in row_job] for row, row_job in zip(rows, row_jobs)]
        columns += [f"base s{seed}" + (f" {w}x{h}" if len(sizes) > 1 else "") for _, seed, (w, h) in row_jobs[0]]
        del base

    checkpoint_grid = None
    if s.checkpoints:
        checkpoint_grid, metrics["checkpoints"] = sample_checkpoints(cfg, pipe, run_dir, base_model, validate, device)
    metrics["seconds"] = round(time.time() - started, 1)

    with atomic_dir(out) as tmp:
        for job, im in images.items():
            im.save(tmp / image_name(job, len(sizes) > 1))
        if base_images:
            (tmp / "base").mkdir()
            for job, im in base_images.items():
                im.save(tmp / "base" / image_name(job, len(sizes) > 1))
        make_grid(rows, s.prompts, columns).save(tmp / "grid.png")
        if checkpoint_grid:
            checkpoint_grid.save(tmp / "checkpoints.png")
        write_json(tmp / "metrics.json", metrics)
    summary = [f"{k} {metrics[k]:.4f}" for k in ("val_loss", "digit_accuracy", "digit_spread", "clip_score", "clip_spread") if metrics.get(k) is not None]
    print(f"sample: {len(images)} images -> {out}; " + ", ".join(summary))
    return metrics


def sampled_checkpoints(cfg: Config, run_dir: Path) -> tuple[int, list[int]]:
    """(final step, the steps sample.checkpoints names), or a clear error for one training did not
    keep: checked before any model is loaded, not after minutes of sampling."""
    final = read_json(run_dir / "train.json", "training result")["final_step"]
    steps = sorted({final if c == "last" else c for c in cfg.sample.checkpoints})
    for step in steps:
        tag = checkpoint_tag(step)
        if not (run_dir / "checkpoints" / tag / "meta.json").is_file():
            raise FileNotFoundError(f"checkpoint {run_dir / 'checkpoints' / tag} was not kept (sample.checkpoints "
                                    f"must be listed before training reaches it)")
    return final, steps


def sample_checkpoints(cfg: Config, pipe, run_dir: Path, base_model: Path, validate: Validator, device: torch.device):
    """checkpoint x prompt grid (first seed) and the validation loss of each checkpoint, sampled here,
    outside the training processes, from the checkpoints training kept."""
    from .ema import checkpoint_denoiser

    s = cfg.sample
    final, steps = sampled_checkpoints(cfg, run_dir)
    jobs = [(pi, s.seeds[0], s.sizes(cfg.cache.resolution)[0]) for pi in range(len(s.prompts))]
    rows, labels, losses = [], [], {}
    name = family_of(base_model).denoiser
    merged = getattr(pipe, name)
    for step in steps:
        tag = checkpoint_tag(step)
        setattr(pipe, name, checkpoint_denoiser(cfg, base_model, run_dir / "checkpoints", tag).to(device, merged.dtype))
        images = generate(pipe, cfg, jobs, device)
        rows.append([images[j] for j in jobs])
        labels.append(f"step {step}" + (" (last)" if step == final else ""))
        losses[str(step)] = {"val_loss": validate(pipe, device)}
    setattr(pipe, name, merged)
    return make_grid(rows, labels, s.prompts), losses


def main(argv: list[str] | None = None) -> None:
    args, cfg = stage_main("sample", __doc__, argv, {"model": "merged model folder", "out": "output folder"},
                           {"base_model": "base model folder (LoRA-only merges, compare_base, validation loss)",
                            "latents": "latent cache folder (validation loss on its held-out samples)",
                            "run_dir": "run folder (sample.checkpoints)"})
    opt = {k: Path(v) if v else None for k, v in vars(args).items() if k in ("base_model", "latents", "run_dir")}
    if (cfg.sample.compare_base or cfg.sample.checkpoints) and not opt["base_model"]:
        raise SystemExit("error: sample.compare_base and sample.checkpoints need --base-model")
    if cfg.sample.checkpoints and not opt["run_dir"]:
        raise SystemExit("error: sample.checkpoints needs --run-dir")
    if cfg.sample.checkpoints:
        sampled_checkpoints(cfg, opt["run_dir"])
    sample(cfg, Path(args.model), Path(args.out), opt["base_model"], opt["latents"], opt["run_dir"])


if __name__ == "__main__":
    run(main)
