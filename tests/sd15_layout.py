"""Model folders laid out like the real Stable Diffusion 1.5 repos, at tiny sizes.

`stable-diffusion-v1-5/stable-diffusion-v1-5` lists a safety checker and a feature extractor in
model_index.json (with `requires_safety_checker: true`), ships fp16 variant files beside the fp32
ones, and fine-tuned repos often have `.bin`-only text encoders, fp16-only weights, or
`safety_checker: [null, null]`. These builders turn a built tiny model into such folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def add_safety_checker(folder: Path) -> None:
    """A tiny StableDiffusionSafetyChecker and CLIPImageProcessor, listed in model_index.json."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    StableDiffusionSafetyChecker(config).save_pretrained(folder / "safety_checker", safe_serialization=True)
    CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}).save_pretrained(folder / "feature_extractor")
    _edit_index(folder, safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)


def null_safety_checker(folder: Path) -> None:
    """As many fine-tuned repos have it: listed as null, yet `requires_safety_checker: true`."""
    _edit_index(folder, safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=True)


def fp16_variants(folder: Path, *components: str, keep_fp32: bool) -> None:
    """`<name>.fp16.safetensors` beside (keep_fp32) or instead of the fp32 weights."""
    for component in components:
        for weights in sorted((folder / component).glob("*.safetensors")):
            if weights.name.count(".") != 1:
                continue
            half = {k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}
            save_file(half, weights.with_name(weights.stem + ".fp16.safetensors"), metadata={"format": "pt"})
            if not keep_fp32:
                weights.unlink()


def bin_text_encoder(folder: Path) -> None:
    """The text encoder as `pytorch_model.bin` only (older repos)."""
    weights = folder / "text_encoder" / "model.safetensors"
    torch.save(load_file(weights), weights.with_name("pytorch_model.bin"))
    weights.unlink()


def sd15_layout(src: Path, dst: Path, *, safety: str = "tiny", fp16: str = "beside", bin_te: bool = True) -> Path:
    """A copy of `src` laid out like an SD 1.5 repo. safety: tiny | null; fp16: beside | only | none."""
    shutil.copytree(src, dst)
    (dst / "fetch.json").unlink(missing_ok=True)
    add_safety_checker(dst) if safety == "tiny" else null_safety_checker(dst)
    if fp16 != "none":
        fp16_variants(dst, "unet", "vae", keep_fp32=fp16 == "beside")
    if bin_te:
        bin_text_encoder(dst)
    (dst / "v1-5-pruned-emaonly.safetensors").write_bytes(b"single-file checkpoint; not a pipeline part")
    return dst


def _edit_index(folder: Path, **entries) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index.update(entries)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
