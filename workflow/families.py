"""What differs between Stable Diffusion model families, read from a diffusers model folder.

One place knows the families; stages ask `family_of(model_dir)` and read the answer's fields rather
than branching on family names. The family comes from the folder itself (model_index.json, the UNet's
and text encoder's configs), never from a flag the user must keep in sync.

| family | text encoder(s) | original (single-file) layout |
|---|---|---|
| sd1  | CLIP ViT-L (HF layout, `quick_gelu`) | CompVis ldm: `cond_stage_model.transformer.` |
| sd2  | OpenCLIP ViT-H (`gelu`), penultimate layer | Stability stablediffusion: `cond_stage_model.model.` (OpenCLIP layout) |
| sdxl | CLIP ViT-L + OpenCLIP ViT-bigG | Stability sgm: `conditioner.embedders.{0,1}.` |
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TextEncoderLayout:
    folder: str  # the diffusers component: text_encoder, text_encoder_2
    tokenizer: str  # its tokenizer's component: tokenizer, tokenizer_2
    prefix: str  # its keys' prefix in the single file
    openclip: bool  # OpenCLIP's layout (fused in_proj, resblocks) instead of the HF CLIP one
    # Which hidden states condition the UNet: "last" (last_hidden_state, final layer norm applied;
    # SD 2.x folders already drop OpenCLIP's last layer) or "penultimate" (hidden_states[-2], SDXL).
    hidden_state: str = "last"
    # Its projected pooled embedding is the UNet's `text_embeds`, beside the `time_ids` (original size,
    # crop top-left, target size): SDXL's second encoder (`addition_embed_type: text_time`).
    pooled: bool = False


@dataclass(frozen=True)
class Family:
    name: str  # sd1 | sd2 | sdxl
    modelspec: str  # ModelSpec architecture id stem (the "-768-v" variant is added for v-prediction SD 2.x)
    implementation: str  # ModelSpec implementation of the single-file layout
    text_encoders: tuple[TextEncoderLayout, ...]
    kohya_unet_names: str  # "diffusers": lora_unet_down_blocks_...; "original": lora_unet_input_blocks_...
    lora_version: str  # kohya's ss_base_model_version
    ldm_target: str  # the original config's model class (written into the A1111 .yaml)
    pipeline: str  # the diffusers pipeline class that loads and samples the folder
    # What a dropped caption becomes: "empty" (the encoded empty caption, as SD 1.x/2.x were trained)
    # or "zeros" (zero hidden states and pooled embedding: SDXL was trained with sgm's conditioner
    # zeroing dropped embeddings, and its pipeline's force_zeros_for_empty_prompt samples that way).
    null_caption: str = "empty"


UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

FAMILIES = {
    "sd1": Family("sd1", "stable-diffusion-v1", "https://github.com/CompVis/stable-diffusion",
                  (TextEncoderLayout("text_encoder", "tokenizer", "cond_stage_model.transformer.", False),), "diffusers",
                  "sd_v1", "ldm.models.diffusion.ddpm.LatentDiffusion", "StableDiffusionPipeline"),
    "sd2": Family("sd2", "stable-diffusion-v2", "https://github.com/Stability-AI/stablediffusion",
                  (TextEncoderLayout("text_encoder", "tokenizer", "cond_stage_model.model.", True),), "diffusers",
                  "sd_v2", "ldm.models.diffusion.ddpm.LatentDiffusion", "StableDiffusionPipeline"),
    "sdxl": Family("sdxl", "stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models",
                   (TextEncoderLayout("text_encoder", "tokenizer", "conditioner.embedders.0.transformer.", False,
                                      "penultimate"),
                    TextEncoderLayout("text_encoder_2", "tokenizer_2", "conditioner.embedders.1.model.", True,
                                      "penultimate", pooled=True)),
                   "original", "sdxl_base_v1-0", "sgm.models.diffusion.DiffusionEngine", "StableDiffusionXLPipeline",
                   null_caption="zeros"),
}


def component_config(model_dir: Path, component: str) -> dict:
    path = Path(model_dir) / component / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def family_of(model_dir: str | Path) -> Family:
    """The family of a diffusers Stable Diffusion folder: SDXL if its UNet takes SDXL's added
    text/time conditions (or a second text encoder is listed), SD 2.x if its text encoder is
    OpenCLIP's (gelu activation), else SD 1.x."""
    model_dir = Path(model_dir)
    index = json.loads((model_dir / "model_index.json").read_text())
    if component_config(model_dir, "unet").get("addition_embed_type") == "text_time" or "text_encoder_2" in index:
        return FAMILIES["sdxl"]
    if component_config(model_dir, "text_encoder").get("hidden_act") == "gelu":
        return FAMILIES["sd2"]
    return FAMILIES["sd1"]


def down_sampling(model_dir: str | Path, component: str) -> int:
    """How much a VAE (or a UNet) shrinks its input: 2 per block but the last."""
    return 2 ** (len(component_config(Path(model_dir), component)["block_out_channels"]) - 1)


# What native_resolution gives for each builtin, known before it is built (the cache's folder name
# is decided when Snakemake reads the config). The builders take their sizes from here.
BUILTIN_RESOLUTIONS = {"builtin:tiny": 32, "builtin:tiny-sd2": 32, "builtin:tiny-xl": 32,
                       "builtin:sd15-arch": 512, "builtin:sdxl-arch": 1024}


def declared_resolution(pretrained: str) -> int | None:
    """The native resolution of `model.pretrained` where it is known without fetching it: a builtin,
    or a local diffusers folder; None for a Hub id or a single-file checkpoint."""
    if pretrained in BUILTIN_RESOLUTIONS:
        return BUILTIN_RESOLUTIONS[pretrained]
    folder = Path(pretrained).expanduser()
    if (folder / "unet" / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        return native_resolution(folder)
    return None


def native_resolution(model_dir: str | Path) -> int:
    """The image size the model was built for: its UNet's sample size times the VAE's down-sampling
    (512 for SD 1.5, 768 for SD 2.x-768, 1024 for SDXL)."""
    return int(component_config(Path(model_dir), "unet")["sample_size"]) * down_sampling(model_dir, "vae")
