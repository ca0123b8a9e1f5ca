"""What differs between Stable Diffusion model families, read from a diffusers model folder.

One place knows the families; stages ask `family_of(model_dir)` and read the answer's fields rather
than branching on family names. The family comes from the folder itself (model_index.json, the UNet's
and text encoder's configs), never from a flag the user must keep in sync.

| family | text encoder(s) | original (single-file) layout |
|---|---|---|
| sd1  | CLIP ViT-L (HF layout, `quick_gelu`) | CompVis ldm: `cond_stage_model.transformer.` |
| sd2  | OpenCLIP ViT-H (`gelu`), penultimate layer | Stability stablediffusion: `cond_stage_model.model.` (OpenCLIP layout) |
| sdxl | CLIP ViT-L + OpenCLIP ViT-bigG | Stability sgm: `conditioner.embedders.{0,1}.` |
| flux | CLIP ViT-L (pooled) + T5-XXL | Black Forest Labs' `double_blocks`/`single_blocks` (workflow/flux.py) |

A family is one `Family` (or subclass) in FAMILIES: SD 1.x/2.x/SDXL here, FLUX.1 in workflow/flux.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class TextEncoderLayout:
    folder: str  # the diffusers component: text_encoder, text_encoder_2
    tokenizer: str  # its tokenizer's component: tokenizer, tokenizer_2
    prefix: str  # its keys' prefix in the single file
    openclip: bool  # OpenCLIP's layout (fused in_proj, resblocks) instead of the HF CLIP one
    # Which hidden states condition the denoiser: "last" (last_hidden_state, final layer norm applied;
    # SD 2.x folders already drop OpenCLIP's last layer), "penultimate" (hidden_states[-2], SDXL), or
    # None: none of this encoder's (FLUX's CLIP gives only its pooled output).
    hidden_state: str | None = "last"
    # Its pooled embedding: "projected" (text_embeds: SDXL's second encoder, the UNet's `text_embeds`
    # beside the size `time_ids`), "pooler" (pooler_output: FLUX's CLIP), or None.
    pooled: str | None = None
    # The token its tokenizer pads with: OpenAI's CLIP tokenizers pad with <|endoftext|>, OpenCLIP's
    # with "!" (id 0), and the hidden states after the caption differ with it (single_file.py builds
    # tokenizers for checkpoints that lack them).
    pad_token: str = "<|endoftext|>"
    tokenizer_class: str = "CLIPTokenizer"


@dataclass(frozen=True)
class AutoDefaults:
    """What the `auto` training settings resolve to for a family (workflow/auto.py), each with its source."""

    lr_full: float  # full fine-tuning
    lr_lora: float  # LoRA
    lr_source: str
    # Micro-batch on one 80 GB GPU at reference_resolution (measured, BENCHMARKS.md); at another
    # resolution it scales with the pixel count (activations do).
    micro_batch: int
    reference_resolution: int
    gradient_checkpointing: bool
    compile: bool  # on a GPU: measured faster compiled, and its compiled gradients checked against eager
    cache_batch: int  # images per VAE forward at cache time
    # Denoiser parameters, billions: what a full fine-tune's weights, gradients and AdamW states take.
    parameters_b: float = 0.0
    # LoRA's precision on GPUs where train.precision is auto (None: as a full fine-tune's). FLUX: bf16,
    # the frozen 12 B base at 24 GB as every FLUX trainer holds it (bf16-mixed keeps it in fp32, 48 GB).
    lora_precision: str | None = None
    # Sampling memory on a GPU (GiB, fp16 pipeline at reference_resolution, measured: bench/sample_memory.py):
    # the pipeline's own, and each image of a batch; None where not measured (batch of 1 then); and
    # the largest batch measured or run under a card's cap: no figure says a larger one fits.
    sample_fixed_gib: float | None = None
    sample_per_image_gib: float | None = None
    sample_max_batch: int = 1
    # Where micro_batch and gradient_checkpointing are not measured figures: why they are what they are
    # (shown as the reason of the `auto` choice instead of "measured").
    unmeasured: str | None = None
    lr_schedule: str = "constant"
    guidance_scale: float = 4.0  # sample.guidance_scale auto
    # train.steps auto for the tiny builtins: this many samples seen (their data are the digits)
    demo_samples: int = 19_200


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
    defaults: AutoDefaults
    # What a dropped caption becomes: "empty" (the encoded empty caption, as SD 1.x/2.x were trained)
    # or "zeros" (zero hidden states and pooled embedding: SDXL was trained with sgm's conditioner
    # zeroing dropped embeddings, and its pipeline's force_zeros_for_empty_prompt samples that way).
    null_caption: str = "empty"

    # The denoiser: its component folder and class; LoRA files name its layers with this keyword
    # (save_lora_weights(unet_lora_layers=...)).
    denoiser: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"
    lora_layers_kwarg: str = "unet_lora_layers"
    # The LoRA file's key form: "diffusers" (lora.down/lora.up, what diffusers' SD LoRA scripts save)
    # or "peft" (lora_A/lora_B, what its FLUX script saves and ComfyUI reads for FLUX).
    lora_keys: str = "diffusers"
    default_sampler: str = "ddim"  # what sample.scheduler=auto samples with
    # The dtype cache and sample run the model in on a GPU: fp16 for SD (its VAE's force_upcast
    # aside); bf16 for FLUX, whose T5 and transformer overflow in fp16 (both were trained in bf16).
    gpu_dtype: str = "fp16"
    # Block classes train.compile_scope: blocks compiles beside the model's own `_repeated_blocks`
    # (diffusers lists only the UNet's transformer blocks; its resnets, where GroupNorm + SiLU + conv
    # fuse, repeat as much: SDXL's 22 share about ten shapes).
    compiled_regions: tuple[str, ...] = ("ResnetBlock2D",)
    # ModelSpec architecture suffix by prediction type (SD 2.x: -768-v or -512)
    modelspec_suffixes: dict = field(default_factory=dict)

    def blocks(self, config: dict) -> list[str]:
        """The denoiser's top-level blocks (from its config), the units train.gradient_checkpointing
        names: for a UNet down_blocks.N, mid_block, up_blocks.N (SD 1.x/2.x: 4 down, 4 up; SDXL: 3, 3)."""
        mid = [] if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None else ["mid_block"]
        return ([f"down_blocks.{i}" for i in range(len(config["down_block_types"]))] + mid
                + [f"up_blocks.{i}" for i in range(len(config["up_block_types"]))])

    @staticmethod
    def top_block(module_name: str) -> str:
        """The block a module belongs to: 'down_blocks.1.attentions.0' -> 'down_blocks.1',
        'mid_block.resnets.0' -> 'mid_block'."""
        parts = module_name.split(".")
        return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]

    def inference_dtype(self, device):
        """The dtype cache and sample load the model in: gpu_dtype on a GPU, fp32 on the CPU."""
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16}[self.gpu_dtype] if device.type == "cuda" else torch.float32

    def configure_attention(self, device) -> str:
        """Set the attention backends training may use on `device`; returns which, for train.json."""
        return "PyTorch's scaled_dot_product_attention, its default backend choice"

    def set_checkpointing(self, model, blocks: list[str]) -> None:
        """Recompute exactly `blocks` in the backward: diffusers switches every block (and each
        Transformer2DModel inside) at once, so switch all on, then off again outside `blocks` (memory
        is mostly in the high-resolution blocks; recomputing the rest costs time for little memory)."""
        if not blocks:
            model.disable_gradient_checkpointing()
            return
        model.enable_gradient_checkpointing()
        for name, module in model.named_modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = self.top_block(name) in blocks

    def predict(self, model, noisy, timesteps, text, pooled, sizes, dtype, guidance=None):
        """The denoiser's output for noised latents, as the family's pipeline calls it: the UNet takes
        the text hidden states and, for SDXL, `added_cond_kwargs` (the pooled embedding as
        `text_embeds`, the size conditions as `time_ids`, kept in fp32: sizes above 256 are not all
        exact in bf16). `guidance`: only guidance-distilled families have that input."""
        added = None if pooled is None else {"text_embeds": pooled.to(dtype), "time_ids": sizes.float()}
        return model(noisy.to(dtype), timesteps, encoder_hidden_states=text.to(dtype), added_cond_kwargs=added).sample

    def objective(self, model_dir: Path, prediction_type: str | None = None, train=None):
        """What the denoiser learns (workflow/objective.py): the folder's DDPM schedule, predicting
        `prediction_type` (None: what the scheduler says)."""
        from diffusers import DDPMScheduler

        from .objective import DDPMObjective

        if train is not None and train.timestep_sampling not in (None, "uniform"):
            raise ValueError(f"train.timestep_sampling: {train.timestep_sampling} draws flow-matching sigmas; a "
                             f"{self.name} model's DDPM timesteps are drawn uniformly: leave it unset")
        scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        return DDPMObjective(scheduler, prediction_type or scheduler.config.prediction_type)

    def latent_multiple(self, model_dir: Path) -> int:
        """What latent sides must be multiples of: the UNet's own down-sampling."""
        return down_sampling(model_dir, self.denoiser)

    def native_resolution(self, model_dir: Path) -> int:
        """The image size the model was built for: its UNet's sample size times the VAE's down-sampling
        (512 for SD 1.5, 768 for SD 2.x-768, 1024 for SDXL)."""
        return int(component_config(Path(model_dir), "unet")["sample_size"]) * down_sampling(model_dir, "vae")

    def set_sampler(self, pipe, name: str) -> None:
        """sample.scheduler: a sampler built from the model's own noise schedule (betas, prediction
        type, spacing); auto: DDIM."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

        config = pipe.scheduler.config
        pipe.scheduler = {
            "ddim": lambda: DDIMScheduler.from_config(config),
            "dpm++": lambda: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
            "euler": lambda: EulerDiscreteScheduler.from_config(config),
            "pndm": lambda: PNDMScheduler.from_config(config, skip_prk_steps=True),
        }[self.default_sampler if name == "auto" else name]()

    def sample_kwargs(self, pipe, sample_cfg, prompts: int) -> dict:
        """The pipeline's guidance arguments. No negative prompt: the pipeline's unconditional
        embedding, the null caption training used (the empty caption encoded; zeros for SDXL, whose
        pipeline zeroes only when it is None)."""
        negative = [sample_cfg.negative_prompt] * prompts if sample_cfg.negative_prompt else None
        return {"guidance_scale": sample_cfg.guidance_scale, "negative_prompt": negative}

    def checkpoint_state_dict(self, model_dir: Path, dtype) -> dict:
        """The merged folder as one file in the family's original single-file layout (export)."""
        from .export import checkpoint_state_dict

        return checkpoint_state_dict(model_dir, self, dtype)

    def kohya_lora_state_dict(self, lora_file: Path, base_dir: Path) -> tuple[dict, float, int]:
        """(kohya-layout LoRA, alpha, rank) from the merge's diffusers-format LoRA file (export)."""
        from .export import kohya_lora_state_dict

        return kohya_lora_state_dict(lora_file, self, component_config(Path(base_dir), self.denoiser))

    def build_tiny(self, out_dir: Path, images, captions: list[str], steps: int, batch: int, seed: int) -> dict:
        from .models import build_tiny

        return build_tiny(out_dir, images, captions, steps, batch, seed, self.name)


UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# diffusers' examples/text_to_image: train_text_to_image.py at 1e-5 (SD full), its LoRA script at 1e-4;
# README_sdxl.md: 1e-6 for SDXL full, 1e-4 for SDXL LoRA. Micro-batches and compile: BENCHMARKS.md
# (SD 1.5 compiled at 64 on one H100/H200; SDXL eager at 8 with every block recomputed).
# Sampling (BENCHMARKS.md "Sampling memory", one H100): peak reserved memory, the larger of two fits; the
# per-image slope of allocated memory where it exceeds the reserved one's (SDXL: the pool barely grows).
SD_DEFAULTS = AutoDefaults(lr_full=1e-5, lr_lora=1e-4, lr_source="diffusers' text_to_image examples", micro_batch=64,
                           reference_resolution=512, gradient_checkpointing=False, compile=True, cache_batch=32,
                           parameters_b=0.87, sample_fixed_gib=2.99, sample_per_image_gib=0.137, sample_max_batch=64)
SDXL_DEFAULTS = AutoDefaults(lr_full=1e-6, lr_lora=1e-4, lr_source="diffusers' text_to_image README_sdxl",
                             micro_batch=8, reference_resolution=1024, gradient_checkpointing=True, compile=False,
                             cache_batch=8, parameters_b=2.57, sample_fixed_gib=15.32, sample_per_image_gib=0.0136,
                             sample_max_batch=8)
# The tiny builtins (CPU demo): the rate and micro-batch `make run` learns the digits with (README),
# 19,200 samples (300 steps of 2 ranks x 32) unless train.steps or epochs say otherwise.
TINY_DEFAULTS = AutoDefaults(lr_full=2e-3, lr_lora=2e-3, lr_source="the CPU demo's measured rate", micro_batch=32,
                             reference_resolution=32, gradient_checkpointing=False, compile=False, cache_batch=64,
                             sample_fixed_gib=None, sample_per_image_gib=None)
# The default run (builtin:tiny on the digits), issue 51: at guidance 4 the ten seeds of a prompt drew
# nearly one image (digit_spread 0.55, recall 0.18, accuracy 0.99); no CFG kept the variety (spread
# 0.95) but not the digit (0.81). The VAE keeps the variety (real digits round-tripped: spread 0.99),
# stochastic DDIM (eta 1) and guidance on part of the steps did not help; a better conditional model
# did: 450 steps decaying (cosine) at guidance 1.25 scored accuracy 0.94, spread 0.87 (docs/sampling.md).
DEMO_DEFAULTS = replace(TINY_DEFAULTS, lr_schedule="cosine", guidance_scale=1.25, demo_samples=28_800)
OPENCLIP_PAD = "!"

FAMILIES = {
    "sd1": Family("sd1", "stable-diffusion-v1", "https://github.com/CompVis/stable-diffusion",
                  (TextEncoderLayout("text_encoder", "tokenizer", "cond_stage_model.transformer.", False),), "diffusers",
                  "sd_v1", "ldm.models.diffusion.ddpm.LatentDiffusion", "StableDiffusionPipeline", SD_DEFAULTS),
    "sd2": Family("sd2", "stable-diffusion-v2", "https://github.com/Stability-AI/stablediffusion",
                  (TextEncoderLayout("text_encoder", "tokenizer", "cond_stage_model.model.", True,
                                     pad_token=OPENCLIP_PAD),), "diffusers",
                  "sd_v2", "ldm.models.diffusion.ddpm.LatentDiffusion", "StableDiffusionPipeline", SD_DEFAULTS,
                  modelspec_suffixes={"v_prediction": "-768-v", "epsilon": "-512"}),
    "sdxl": Family("sdxl", "stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models",
                   (TextEncoderLayout("text_encoder", "tokenizer", "conditioner.embedders.0.transformer.", False,
                                      "penultimate"),
                    TextEncoderLayout("text_encoder_2", "tokenizer_2", "conditioner.embedders.1.model.", True,
                                      "penultimate", pooled="projected", pad_token=OPENCLIP_PAD)),
                   "original", "sdxl_base_v1-0", "sgm.models.diffusion.DiffusionEngine", "StableDiffusionXLPipeline",
                   SDXL_DEFAULTS, null_caption="zeros"),
}
# The builtins, known before they are built (the Snakefile resolves `auto` from them): each one's
# family; the tiny ones (fitted on the data: Family.build_tiny); the real architectures with random
# weights and their builders ("module:function"). A family module adds its own (workflow/flux.py).
BUILTIN_FAMILIES = {"builtin:tiny": "sd1", "builtin:tiny-sd2": "sd2", "builtin:tiny-xl": "sdxl",
                    "builtin:sd15-arch": "sd1", "builtin:sdxl-arch": "sdxl"}
TINY_BUILTINS = {"builtin:tiny": "sd1", "builtin:tiny-sd2": "sd2", "builtin:tiny-xl": "sdxl"}
ARCH_BUILTINS = {"builtin:sd15-arch": "workflow.models:build_sd15_arch", "builtin:sdxl-arch": "workflow.models:build_sdxl_arch"}
# Arch builtins whose denoiser is a slice of the family's (fewer blocks), billions of parameters: what
# a full fine-tune's states are checked against instead of the family's whole model.
SLICED_BUILTIN_PARAMETERS_B: dict[str, float] = {}


def component_config(model_dir: Path, component: str) -> dict:
    path = Path(model_dir) / component / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# The pipelines each family's folder names in model_index.json.
PIPELINES = {"StableDiffusionPipeline": ("sd1", "sd2"), "StableDiffusionXLPipeline": ("sdxl",), "FluxPipeline": ("flux",)}


class UnknownModel(ValueError):
    """A folder or file no family knows; the message says what was found."""


def family_of(model_dir: str | Path) -> Family:
    """The family of a diffusers folder: the pipeline model_index.json names, then SDXL if its UNet
    takes SDXL's added text/time conditions, SD 2.x if its text encoder is OpenCLIP's (gelu), else SD
    1.x. A pipeline no family knows (SD3, a ControlNet folder, ...) is refused, naming it."""
    model_dir = Path(model_dir)
    index = json.loads((model_dir / "model_index.json").read_text())
    pipeline = index.get("_class_name")
    sd_variant = (pipeline or "").startswith("StableDiffusion") and not pipeline.startswith("StableDiffusion3")
    if pipeline not in PIPELINES and not sd_variant:  # SD 1.x/2.x/XL variants (Img2Img, ...); SD3 is not one
        raise UnknownModel(f"{model_dir} holds a {pipeline} (model_index.json): not a model family this workflow "
                           f"trains ({', '.join(sorted(PIPELINES))})")
    if len(PIPELINES.get(pipeline, ())) == 1:
        return FAMILIES[PIPELINES[pipeline][0]]
    if component_config(model_dir, "unet").get("addition_embed_type") == "text_time" or "text_encoder_2" in index:
        return FAMILIES["sdxl"]
    if component_config(model_dir, "text_encoder").get("hidden_act") == "gelu":
        return FAMILIES["sd2"]
    return FAMILIES["sd1"]


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded diffusers pipeline (as family_of tells a folder's)."""
    name = type(pipe).__name__
    if name not in PIPELINES:
        raise UnknownModel(f"a {name}: not a model family this workflow trains ({', '.join(sorted(PIPELINES))})")
    if len(PIPELINES[name]) == 1:
        return FAMILIES[PIPELINES[name][0]]
    return FAMILIES["sd2" if pipe.text_encoder.config.hidden_act == "gelu" else "sd1"]


def family_of_denoiser(model) -> Family:
    """A family whose denoiser is `model`'s class (SD 1.x/2.x/XL share the UNet's class and what the
    stages ask of it: its blocks)."""
    name = type(model).__name__
    found = next((f for f in FAMILIES.values() if f.denoiser_class == name), None)
    if found is None:
        raise UnknownModel(f"a {name}: not a denoiser of a model family this workflow trains")
    return found


# Keys that tell the families apart in an original-layout single file (the ones diffusers'
# single_file_utils.infer_diffusers_model_type checks): SDXL's second text encoder, SD 2.x's
# 1024-wide cross-attention, SD 1.x's last UNet output block.
SINGLE_FILE_KEYS = {
    "sdxl": "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
    "sd2": "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
    "sd1": "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
}
# Other architectures' marker keys, to name what a refused file is.
OTHER_SINGLE_FILES = {"double_blocks.0.img_attn.qkv.weight": "FLUX.1 transformer",
                      "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": "FLUX.1 transformer",
                      "joint_blocks.0.context_block.attn.qkv.weight": "Stable Diffusion 3",
                      "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": "Stable Diffusion 3",
                      "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": "SDXL refiner",
                      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": "a LoRA (not a model)"}


def family_of_checkpoint(shapes: dict[str, tuple[int, ...]], where: str) -> Family:
    """The family of an original-layout single-file checkpoint from its keys and shapes."""
    if SINGLE_FILE_KEYS["sdxl"] in shapes:
        return FAMILIES["sdxl"]
    cross = shapes.get(SINGLE_FILE_KEYS["sd2"])
    if cross is not None and cross[-1] == 1024:
        return FAMILIES["sd2"]
    if SINGLE_FILE_KEYS["sd1"] in shapes and cross is not None and cross[-1] == 768:
        return FAMILIES["sd1"]
    named = next((what for key, what in OTHER_SINGLE_FILES.items() if key in shapes), None)
    if named is None and any(k.startswith("lora_") or ".lora_" in k for k in shapes):
        named = "a LoRA (not a model)"
    sample = ", ".join(sorted(shapes)[:3])
    raise UnknownModel(f"{where}: " + (f"a {named} checkpoint, not a family this workflow trains (SD 1.x, 2.x, SDXL)"
                                        if named else f"not an SD 1.x/2.x/SDXL checkpoint in the original layout "
                                        f"({len(shapes)} tensors, e.g. {sample})"))


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
    if (folder / "model_index.json").is_file() and (folder / "vae" / "config.json").is_file():
        try:
            return native_resolution(folder)
        except (UnknownModel, KeyError, ValueError):
            return None
    return None


def native_resolution(model_dir: str | Path) -> int:
    """The image size the model was built for (512 for SD 1.5, 768 for SD 2.x-768, 1024 for SDXL and FLUX.1)."""
    return family_of(model_dir).native_resolution(Path(model_dir))


from . import flux  # noqa: E402,F401 (registers FLUX.1 in FAMILIES; it builds on the classes above)
