"""Sampling memory of a model family on a GPU: what `sample.batch_size: auto` is fitted to. Prints JSON.

    python bench/sample_memory.py --model builtin:sdxl-arch --batches 1 2 4 8
    python bench/sample_memory.py --model builtin:sd15-arch --batches 1 4 8 16
    python bench/sample_memory.py --model builtin:sdxl-arch --batches 1 2 4 8 --stage config/cards/sdxl-lora-16gb.yaml --memory-cap-gb 16

Builds the model (`builtin:*-arch`: the real architecture, random weights), loads it as the sample
stage does (its family's pipeline in fp16, the VAE decoding one image at a time) and, for each batch
size, draws one batch at the model's resolution (`--steps` denoising steps: memory does not grow
with them) and reads torch.cuda.max_memory_allocated / _reserved. The fit: peak = fixed + per_image
x batch (least squares over the batch sizes). With `--stage RECIPE`, it then runs the sample stage
itself (`python -m workflow.sample`, as the rule does) on a LoRA-only merge of rank 32 (what the
recipe trains) with that recipe's config under `--memory-cap-gb`, at the batch size the fit gives
for the recipe's card (workflow/auto.py's batch_that_fits, with which `auto` picks it once the fit is
in workflow/families.py), and reports its peak from metrics.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from workflow.auto import batch_that_fits  # noqa: E402
from workflow.config import load_config, load_config_files  # noqa: E402
from workflow.families import family_of, native_resolution  # noqa: E402
from workflow.fetch_model import fetch_model  # noqa: E402
from workflow.sample import generate, load_pipeline, set_scheduler  # noqa: E402


def measure(model: Path, batches: list[int], steps: int) -> list[dict]:
    device = torch.device("cuda")
    pipe = load_pipeline(model, device)
    set_scheduler(pipe, "auto")  # the family's sampler: memory does not depend on it
    res = native_resolution(model)
    rows = []
    for batch in batches:
        cfg = load_config(REPO / "config.yaml", [f"sample.batch_size={batch}", f"sample.steps={steps}",
                                                 "sample.prompts=['a photo of a cat on a sofa']"])
        jobs = [(0, seed, (res, res)) for seed in range(batch)]
        generate(pipe, cfg, jobs[:1], device)  # warm-up: kernels, workspaces
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        generate(pipe, cfg, jobs, device)
        torch.cuda.synchronize()
        rows.append({"batch": batch, "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                     "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
                     "s_per_image": round((time.perf_counter() - started) / batch, 3)})
        print(f"bench: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    del pipe
    torch.cuda.empty_cache()
    return rows


def fit(rows: list[dict], key: str) -> tuple[float, float]:
    """(fixed, per image) GiB by least squares over the batch sizes."""
    xs, ys = [r["batch"] for r in rows], [r[key] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return round(my - slope * mx, 3), round(slope, 4)


def lora_only_merge(model: Path, folder: Path, rank: int) -> Path:
    """A LoRA-only merge as the ema stage writes one (pytorch_lora_weights.safetensors + merge.json)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from workflow.config import LoraConfig
    from workflow.models import add_lora, load_denoiser, pipeline_class

    family = family_of(model)
    unet = add_lora(load_denoiser(model), LoraConfig(rank=rank))
    layers = get_peft_model_state_dict(unet)
    if family.lora_keys == "diffusers":
        layers = convert_state_dict_to_diffusers(layers)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_class(model).save_lora_weights(folder, safe_serialization=True, **{family.lora_layers_kwarg: layers})
    (folder / "merge.json").write_text(json.dumps({"base_model": str(model), "mode": "lora",
                                                   "prediction_type": family.objective(model).prediction_type}))
    return folder


def stage_under(recipe: Path, cap: float, model: Path, root: Path, batch: int, images: int) -> dict:
    cfg = load_config_files([REPO / "config.yaml", recipe], [f"model.pretrained={model}", f"train.memory_cap_gb={cap}",
                                                              f"sample.batch_size={batch}", "sample.steps=4",
                                                              f"sample.seeds={list(range(images))}",
                                                              "sample.prompts=['a photo of a cat on a sofa']"])
    lora = lora_only_merge(model, root / "lora", cfg.train.lora.rank)
    out = root / "samples"
    cmd = [sys.executable, "-m", "workflow.sample", "--config", cfg.model_dump_json(), "--model", str(lora),
           "--base-model", str(model), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"sample stage failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {k: metrics[k] for k in ("images", "batch_size", "peak_gpu_allocated_gb", "peak_gpu_reserved_gb",
                                    "memory_cap_gb", "seconds")} | {"recipe": str(recipe)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:sdxl-arch")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--stage", default=None, help="a card recipe: run the sample stage with it (LoRA-only merge)")
    ap.add_argument("--memory-cap-gb", type=float, default=None)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-sample-"))
    model = root / "model"
    if not (model / "model_index.json").is_file():
        fetch_model(load_config(REPO / "config.yaml", [f"model.pretrained={args.model}"]), model, None)
    rows = measure(model, args.batches, args.steps)
    fixed, per_image = fit(rows, "peak_reserved_gib")
    result = {"bench": "sample_memory", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "model": args.model, "family": family_of(model).name, "resolution": native_resolution(model),
              "rows": rows, "fit_reserved_gib": {"fixed": fixed, "per_image": per_image},
              "fit_allocated_gib": dict(zip(("fixed", "per_image"), fit(rows, "peak_allocated_gib")))}
    if args.stage:
        recipe = load_config_files([REPO / "config.yaml", REPO / args.stage]).recipe
        gib = min(recipe.card_gb, args.memory_cap_gb or recipe.card_gb)
        batch = batch_that_fits(gib, fixed, per_image)
        result["stage"] = stage_under(REPO / args.stage, args.memory_cap_gb, model, root, batch, 2 * batch)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
