"""Model folders: building the builtin ones, checking and loading any diffusers SD folder.

Every stage loads components through `from_pretrained` on a diffusers pipeline folder, whether it
is a real Stable Diffusion checkpoint or one that `builtin:tiny` built and saved a moment earlier.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch

from .families import BUILTIN_RESOLUTIONS, FAMILIES, component_config, family_of
from .inputs import check_model_dir  # noqa: F401 (stages import it from here)

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]


# ---------------------------------------------------------------- loading


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def file_variant(name: str) -> str:
    """The variant a weights file name carries: `diffusion_pytorch_model.fp16.safetensors` -> "fp16",
    `model.fp16-00001-of-00002.safetensors` -> "fp16"; "" for plain weights."""
    stem = name.rsplit(".", 1)[0]
    return stem.split(".", 1)[1].split("-")[0] if "." in stem else ""


def is_weights(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def preferred_variant(variants: set[str]) -> str | None:
    """Plain weights win where both are there, so fp32 weights are never replaced by their fp16
    copy; else fp16, else whatever variant there is."""
    if not variants or "" in variants:
        return None
    return "fp16" if "fp16" in variants else sorted(variants)[0]


def weights_variant(folder: Path) -> str | None:
    """The variant to load from a component folder: None where plain weights are there
    (`diffusion_pytorch_model.safetensors`, `pytorch_model.bin`, shards), else the variant its files
    carry (repos that ship only `diffusion_pytorch_model.fp16.safetensors`)."""
    return preferred_variant({file_variant(f.name) for f in folder.iterdir() if is_weights(f.name)})


def pipeline_variant(model_dir: Path) -> str | None:
    """The variant a whole-pipeline `from_pretrained` needs (diffusers falls back to the plain files
    of components that have no such variant)."""
    found = {weights_variant(model_dir / name) for name in pipeline_components(model_dir)} - {None}
    return sorted(found)[0] if found else None


def listed_components(index: dict) -> list[str]:
    """The components a model_index.json lists (null entries, such as a removed safety checker, are
    not components)."""
    return [name for name, entry in index.items()
            if not name.startswith("_") and isinstance(entry, list) and entry[0] is not None]


def pipeline_components(model_dir: Path) -> list[str]:
    """The component folders model_index.json lists and the folder has."""
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    return [name for name in listed_components(index) if (Path(model_dir) / name).is_dir()]


def load_tokenizer(model_dir: Path, folder: str = "tokenizer", cls: str = "CLIPTokenizer"):
    import transformers

    return getattr(transformers, cls).from_pretrained(model_dir, subfolder=folder)


def load_text_encoder(model_dir: Path, device="cpu", dtype=torch.float32, folder: str = "text_encoder"):
    """A text encoder with the class its config names (SDXL's second one has a projection)."""
    import transformers

    config = json.loads((Path(model_dir) / folder / "config.json").read_text())
    cls = getattr(transformers, (config.get("architectures") or ["CLIPTextModel"])[0])
    return cls.from_pretrained(model_dir, subfolder=folder, torch_dtype=dtype,
                               variant=weights_variant(Path(model_dir) / folder)).to(device).eval()


def load_vae(model_dir: Path, device="cpu", dtype=torch.float32):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=dtype,
                                         variant=weights_variant(Path(model_dir) / "vae")).to(device).eval()


def load_denoiser(model_dir: Path, dtype=torch.float32):
    """The model folder's denoiser (the family's: a UNet for SD 1.x/2.x/SDXL) in `dtype`."""
    import diffusers

    family = family_of(model_dir)
    return getattr(diffusers, family.denoiser_class).from_pretrained(
        model_dir, subfolder=family.denoiser, torch_dtype=dtype, variant=weights_variant(Path(model_dir) / family.denoiser))


def checkpointed_blocks(model_dir: Path, setting: bool | list[str]) -> list[str]:
    """The blocks that recompute their activations in backward under train.gradient_checkpointing
    (true: all, false: none, a list: those), refusing a name this denoiser does not have."""
    family = family_of(model_dir)
    blocks = family.blocks(component_config(Path(model_dir), family.denoiser))
    if isinstance(setting, bool):
        return blocks if setting else []
    unknown = [name for name in setting if name not in blocks]
    if unknown:
        raise ValueError(f"train.gradient_checkpointing: {unknown} not among this {family.denoiser}'s blocks "
                         f"({model_dir}): {', '.join(blocks)}")
    return list(setting)


def pipeline_class(model_dir: Path):
    import diffusers

    return getattr(diffusers, family_of(model_dir).pipeline)


def load_pipeline(model_dir: Path, dtype=torch.float32, unfiltered: bool = False, **components):
    """The base pipeline of the folder's family as its folder has it (a safety checker and feature
    extractor included when listed, unless `unfiltered`), each of UNet, VAE and text encoder(s) from
    its own weights variant; `components` replace parts (unet=...)."""
    family = family_of(model_dir)
    components.setdefault("vae", load_vae(model_dir, dtype=dtype))
    for layout in family.text_encoders:
        components.setdefault(layout.folder, load_text_encoder(model_dir, dtype=dtype, folder=layout.folder))
    if family.denoiser not in components:
        components[family.denoiser] = load_denoiser(model_dir, dtype=dtype)
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    if unfiltered and "safety_checker" in index:
        components |= {"safety_checker": None, "requires_safety_checker": False}
    return pipeline_class(model_dir).from_pretrained(model_dir, torch_dtype=dtype, variant=pipeline_variant(model_dir),
                                                     **components)


class PromptEncoder:
    """Captions -> what the family's denoiser is conditioned on, computed as its diffusers pipeline
    does: hidden states (N, tokens, dim; SDXL's two encoders' penultimate layers concatenated; FLUX's
    T5) and, where the family uses one, the pooled embedding (N, dim; SDXL's projected, FLUX's CLIP)."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype):
        self.family = family_of(model_dir)
        self.device = device
        self.tokenizers = [load_tokenizer(model_dir, layout.tokenizer, layout.tokenizer_class)
                           for layout in self.family.text_encoders]
        self.encoders = [load_text_encoder(model_dir, device, dtype, layout.folder) for layout in self.family.text_encoders]

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, pooled = [], None
        for layout, tokenizer, encoder in zip(self.family.text_encoders, self.tokenizers, self.encoders):
            # T5 at most 512 tokens, FluxPipeline's limit (its tokenizer's own max length is larger)
            ids = tokenizer(captions, padding="max_length", max_length=min(512, tokenizer.model_max_length),
                            truncation=True, return_tensors="pt").input_ids
            if self.device.type == "cuda":
                # A blocking upload would wait for the VAE work queued before it and stall the pipeline.
                ids = ids.pin_memory().to(self.device, non_blocking=True)
            out = encoder(ids, output_hidden_states=layout.hidden_state == "penultimate")
            if layout.hidden_state is not None:
                hidden.append(out.hidden_states[-2] if layout.hidden_state == "penultimate" else out.last_hidden_state)
            if layout.pooled is not None:
                pooled = out.text_embeds if layout.pooled == "projected" else out.pooler_output
        return torch.cat(hidden, dim=-1), pooled

    def null_caption(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a dropped caption becomes (one caption's embeddings): see Family.null_caption."""
        hidden, pooled = self([""])
        if self.family.null_caption == "zeros":
            hidden, pooled = torch.zeros_like(hidden), None if pooled is None else torch.zeros_like(pooled)
        return hidden[0], None if pooled is None else pooled[0]


def add_lora(unet, lora):
    """Freeze `unet` and give it peft LoRA adapters (`lora`: train.lora); they are all that trains."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                                target_modules=lora.target_modules, init_lora_weights="gaussian"))
    return unet


def latent_scaling(vae) -> tuple[float, float]:
    """(scale, shift) mapping VAE latents to the diffusion model's space: (z - shift) * scale."""
    return float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)


# ---------------------------------------------------------------- builtin:tiny


def train_clip_tokenizer(corpus: Iterable[str], max_length: int = 16, vocab_size: int = 1000):
    """A CLIP BPE tokenizer learned on the captions. Every byte (and byte + end-of-word) is in the
    vocabulary, so unseen text still tokenizes, as with the real CLIP tokenizer."""
    from tokenizers import pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    scratch = CLIPTokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
    )
    scratch._tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    merges = [tuple(m) for m in json.loads(scratch._tokenizer.to_str())["model"]["merges"]]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + alphabet + [a + "</w>" for a in alphabet] + [a + b for a, b in merges]:
        vocab.setdefault(tok, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def clip_text_encoder(tokenizer, projection_dim: int | None = None, **shape):
    """A randomly initialised CLIP text encoder for `tokenizer` (positions: its max length), with
    a projection (SDXL's second encoder) when `projection_dim` is given; `shape`: hidden_size,
    intermediate_size, num_hidden_layers, num_attention_heads, hidden_act."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **shape,
                            **({"projection_dim": projection_dim} if projection_dim else {}))
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def tiny_text_encoder(tokenizer, hidden_size: int, hidden_act: str = "quick_gelu", projection_dim: int | None = None):
    return clip_text_encoder(tokenizer, projection_dim, hidden_size=hidden_size,
                             intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
                             hidden_act=hidden_act)


CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu"}  # SD 1.x's text encoder, SDXL's first
OPENCLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                 "hidden_act": "gelu"}  # SDXL's second


def sd_vae(**settings):
    """The AutoencoderKL shape SD 1.x, 2.x and SDXL share (random weights)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, **settings)


def tiny_components(tokenizer, resolution: int, seed: int, family: str = "sd1") -> dict[str, Any]:
    """Small components of one family's shape: sd1 (one CLIP text encoder, quick_gelu), sd2 (an
    OpenCLIP-like gelu encoder, linear attention projections) or sdxl (two encoders, the second
    with a projection whose pooled output and the size `time_ids` are the UNet's added
    conditions). The noise schedule reaches (near) zero terminal SNR with v-prediction: SD's
    scaled_linear schedule leaves visible signal at t=T for 8x8 latents, which makes samples drawn
    from pure noise miss the training distribution."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    if family not in FAMILIES:
        raise ValueError(f"no tiny model of family {family!r}; one of {tuple(FAMILIES)}")
    torch.manual_seed(seed)
    unet_extra: dict[str, Any] = {}
    if family == "sdxl":
        # Widths differ, as SDXL's 768 and 1280 do: single-file loaders tell the encoders apart by width.
        encoders = {"text_encoder": tiny_text_encoder(tokenizer, 32),
                    "text_encoder_2": tiny_text_encoder(tokenizer, 48, "gelu", projection_dim=32)}
        # hidden states 32 + 48 concatenated; text_embeds (32) + 6 time ids x 8 sinusoidal features,
        # as SDXL's 1280 + 6 x 256
        unet_extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8, "cross_attention_dim": 80,
                      "projection_class_embeddings_input_dim": 32 + 6 * 8, "use_linear_projection": True}
    else:
        encoders = {"text_encoder": tiny_text_encoder(tokenizer, 64, "gelu" if family == "sd2" else "quick_gelu")}
        unet_extra = {"use_linear_projection": True} if family == "sd2" else {}
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=resolution, scaling_factor=1.0,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=32,
        **({"cross_attention_dim": 64} | unet_extra),
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        clip_sample=False, timestep_spacing="trailing",
    )
    return encoders | {"vae": vae, "unet": unet, "scheduler": scheduler}


def assemble_pipeline(family: str, tokenizer, parts: dict[str, Any]):
    """The diffusers pipeline of `family` from components (the tokenizer shared by every encoder)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer, force_zeros_for_empty_prompt=True,
                                         **parts)
    return StableDiffusionPipeline(tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False, **parts)


def fit_vae(vae, images: torch.Tensor, steps: int, batch: int, seed: int, lr: float = 2e-3, kl_weight: float = 1e-4,
            center: bool = False) -> dict:
    """Fit the tiny VAE on images in [-1, 1] (N, 3, H, W); then set `scaling_factor` so that the
    latents the diffusion model sees have unit variance (and with `center`, `shift_factor` so they
    have zero mean, as FLUX's VAE config does)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    vae.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / post.mean[0].numel()
        loss = torch.nn.functional.mse_loss(rec, x) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g in opt.param_groups:  # cosine decay keeps the last steps from undoing the fit
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        recon = vae.decode(means[:256]).sample
    std = float(means.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    if center:
        vae.register_to_config(shift_factor=float(means.mean()))
    return {"vae_final_loss": float(loss.detach()), "vae_recon_mse": float(torch.nn.functional.mse_loss(recon, images[:256])), "latent_std": std}


def build_tiny(out_dir: Path, images: torch.Tensor, captions: list[str], steps: int, batch: int, seed: int,
               family: str = "sd1") -> dict:
    """builtin:tiny (and tiny-sd2, tiny-xl): tokenizer learned on the captions, VAE fitted on the
    images, random UNet and text encoder(s)."""
    tokenizer = train_clip_tokenizer(captions)
    parts = tiny_components(tokenizer, images.shape[-1], seed, family)
    report = fit_vae(parts["vae"], images, steps, batch, seed)
    assemble_pipeline(family, tokenizer, parts).save_pretrained(out_dir, safe_serialization=True)
    return report


# The real architectures' UNets (UNet2DConditionModel's arguments; its defaults are SD 1.x's UNet).
ARCH_UNETS = {
    "builtin:sd15-arch": dict(sample_size=BUILTIN_RESOLUTIONS["builtin:sd15-arch"] // 8, cross_attention_dim=768),
    "builtin:sdxl-arch": dict(
        sample_size=BUILTIN_RESOLUTIONS["builtin:sdxl-arch"] // 8, block_out_channels=(320, 640, 1280),
        layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816),
}


def build_sd15_arch(out_dir: Path, seed: int = 0) -> dict:
    """builtin:sd15-arch: Stable Diffusion 1.5's architecture with random weights (benchmarks only)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = train_clip_tokenizer(["a photo of a cat", "a painting of a dog"], max_length=77)
    text_encoder = clip_text_encoder(tokenizer, **CLIP_L)
    res = BUILTIN_RESOLUTIONS["builtin:sd15-arch"]
    vae = sd_vae(sample_size=res)
    unet = UNet2DConditionModel(**ARCH_UNETS["builtin:sd15-arch"])
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    parts = {"vae": vae, "text_encoder": text_encoder, "unet": unet, "scheduler": scheduler}
    assemble_pipeline("sd1", tokenizer, parts).save_pretrained(out_dir, safe_serialization=True)
    return {}


def build_sdxl_arch(out_dir: Path, seed: int = 0) -> dict:
    """builtin:sdxl-arch: SDXL 1.0 base's architecture with random weights (benchmarks only): the
    UNet (2.6 B parameters, transformer depths 1/2/10), CLIP ViT-L and OpenCLIP ViT-bigG text
    encoders, the SDXL VAE's shape (scaling 0.13025, run in fp32: force_upcast)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = train_clip_tokenizer(["a photo of a cat", "a painting of a dog"], max_length=77)
    text_encoder = clip_text_encoder(tokenizer, **CLIP_L)
    text_encoder_2 = clip_text_encoder(tokenizer, projection_dim=1280, **OPENCLIP_BIGG)
    res = BUILTIN_RESOLUTIONS["builtin:sdxl-arch"]
    vae = sd_vae(sample_size=res, scaling_factor=0.13025, force_upcast=True)
    unet = UNet2DConditionModel(**ARCH_UNETS["builtin:sdxl-arch"])
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              steps_offset=1, timestep_spacing="leading")
    parts = {"vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "unet": unet,
             "scheduler": scheduler}
    assemble_pipeline("sdxl", tokenizer, parts).save_pretrained(out_dir, safe_serialization=True)
    return {}
