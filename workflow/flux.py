"""FLUX.1 (Black Forest Labs): everything the stages need to know about the family, in one module.

| part | FLUX.1 |
|---|---|
| denoiser | `FluxTransformer2DModel` in `transformer/`: 19 double-stream (MMDiT) blocks, 38 single-stream |
| text | CLIP ViT-L's pooled output (`pooled_projections`) + T5-XXL's last hidden states (`encoder_hidden_states`, 512 tokens for dev, 256 for schnell) |
| latents | 16 channels, `(z - shift_factor) * scaling_factor`, packed into 2x2 patches: (B, h/2 * w/2, 64) tokens with (0, row, column) position ids; text tokens' ids are zeros |
| objective | rectified flow: x_s = (1 - s) x0 + s noise, target noise - x0, s in (0, 1) given to the model as the timestep (it multiplies by 1000) |
| shift | the scheduler's: dev/schnell shift s -> e^mu s / (1 + (e^mu - 1) s), mu growing linearly with the token count (`use_dynamic_shifting`) |
| guidance | dev is guidance-distilled: a `guidance` input (trained at a constant, 1.0 by default as most trainers do); schnell and the tiny builtin have none and sample with true classifier-free guidance |
| sampling | `FluxPipeline` with its `FlowMatchEulerDiscreteScheduler` |

Nothing is imported from torch or diffusers at module level: families.py (read by every `snakemake`
command) registers FLUX from here. Chosen from diffusers (0.42): the pipeline's packing and position ids (`FluxPipeline._pack_latents`,
`_prepare_latent_image_ids`) and its shift (`calculate_shift`) are called, not rewritten, so training
and sampling see the same inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from .families import (ARCH_BUILTINS, BUILTIN_FAMILIES, BUILTIN_RESOLUTIONS, FAMILIES, SLICED_BUILTIN_PARAMETERS_B, TINY_BUILTINS, AutoDefaults, Family,
                       TextEncoderLayout, component_config)

FLOW = "flow"  # the prediction type merge.json and train.json record for flow-matching models


class FlowMatchObjective:
    """Rectified flow (FLUX, SD3): noised x_s = (1 - s) x0 + s noise, target the velocity noise - x0.
    `s` (the sigma) is drawn by `sampling` (logit-normal: sigmoid of N(mean, std), as SD3's paper
    and FLUX trainers do; uniform) and then shifted as the model's scheduler shifts it when sampling:
    `shift` a number, or None for the scheduler's own (FLUX.1: resolution-dependent)."""

    prediction_type = FLOW

    def __init__(self, scheduler_config: dict, sampling: str = "logit_normal", shift: float | None = None,
                 logit_mean: float = 0.0, logit_std: float = 1.0, guidance: float | None = None):
        self.config = dict(scheduler_config)
        self.sampling, self.fixed_shift = sampling, shift
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.guidance = guidance  # the guidance input of a guidance-distilled model; None: the model has none

    def to(self, device: torch.device) -> "FlowMatchObjective":
        return self

    def shift(self, latent_shape: tuple[int, ...]) -> float:
        """The sigma shift for latents of `latent_shape` (C, H, W) as the pipeline computes it."""
        if self.fixed_shift is not None:
            return float(self.fixed_shift)
        if not self.config.get("use_dynamic_shifting"):
            return float(self.config.get("shift", 1.0))
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        tokens = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        mu = calculate_shift(tokens, self.config.get("base_image_seq_len", 256), self.config.get("max_image_seq_len", 4096),
                             self.config.get("base_shift", 0.5), self.config.get("max_shift", 1.15))
        return math.exp(mu)

    @staticmethod
    def shifted(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def random_timesteps(self, n: int, gen: torch.Generator, device: torch.device,
                         latent_shape: tuple[int, ...] = ()) -> torch.Tensor:
        import torch

        if self.sampling == "uniform":
            u = torch.rand(n, generator=gen, device=device)
        else:
            u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=gen, device=device))
        return self.shifted(u, self.shift(latent_shape))

    def fixed_timesteps(self, count: int, latent_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """`count` sigmas, the middles of `count` equal bins of (0, 1), shifted as training shifts them."""
        import torch

        return self.shifted((torch.arange(count) + 0.5) / count, self.shift(latent_shape))

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        s = sigmas.view(-1, *[1] * (latents.dim() - 1)).to(latents.dtype)
        return (1 - s) * latents + s * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        raise ValueError("train.snr_gamma (min-SNR) weighs a DDPM noise schedule; a flow-matching model (FLUX) has "
                         "none: leave train.snr_gamma unset")


def pack(latents: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w) for latents of height x width."""
    b, _, d = tokens.shape
    return tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)


@dataclass(frozen=True)
class FluxFamily(Family):
    denoiser: str = "transformer"
    denoiser_class: str = "FluxTransformer2DModel"
    lora_layers_kwarg: str = "transformer_lora_layers"
    lora_keys: str = "peft"
    gpu_dtype: str = "bf16"
    default_sampler: str = "flow-euler"
    compiled_regions: tuple[str, ...] = ()  # its `_repeated_blocks` are all its blocks

    def blocks(self, config: dict) -> list[str]:
        return ([f"transformer_blocks.{i}" for i in range(config.get("num_layers", 19))]
                + [f"single_transformer_blocks.{i}" for i in range(config.get("num_single_layers", 38))])

    def configure_attention(self, device) -> str:
        """On a GPU: SDPA without its cuDNN backend. For FLUX.1's shapes on an H100 (torch 2.11) the
        default, cuDNN, failed in the backward ("mha_graph.execute ... is_good()", then an illegal
        memory access) while flash attention ran (issue 48's plain-loop measurements)."""
        if device.type != "cuda":
            return "PyTorch's scaled_dot_product_attention (CPU)"
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)
        return "scaled_dot_product_attention without cuDNN (flash, else memory-efficient): cuDNN's FLUX backward failed on an H100"

    def set_checkpointing(self, model, blocks: list[str]) -> None:
        """diffusers' FluxTransformer2DModel recomputes all of its blocks or none (one switch in its forward)."""
        every = self.blocks(model.config)
        if blocks and sorted(blocks) != sorted(every):
            raise ValueError("train.gradient_checkpointing: a FLUX transformer recomputes all of its blocks or none "
                             "(diffusers switches them together): set true or false, not a list")
        (model.enable_gradient_checkpointing if blocks else model.disable_gradient_checkpointing)()

    def predict(self, model, noisy, timesteps, text, pooled, sizes, dtype, guidance=None):
        """The transformer's velocity for noised latents (B, C, h, w), called as FluxPipeline calls it:
        packed 2x2 patches with their position ids, the T5 states and CLIP pooled output, the sigma as
        the timestep and, for a guidance-distilled model, the guidance; unpacked to (B, C, h, w)."""
        import torch

        b, _, h, w = noisy.shape
        config = getattr(model, "module", model).config
        kwargs = {}
        if config.guidance_embeds:
            kwargs["guidance"] = torch.full((b,), 1.0 if guidance is None else guidance, device=noisy.device)
        out = model(hidden_states=pack(noisy.to(dtype)), timestep=timesteps.to(dtype), pooled_projections=pooled.to(dtype),
                    encoder_hidden_states=text.to(dtype), txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=dtype),
                    img_ids=image_ids(h, w, noisy.device, dtype), return_dict=False, **kwargs)[0]
        return unpack(out, h, w)

    def objective(self, model_dir: Path, prediction_type: str | None = None, train=None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if prediction_type not in (None, FLOW):
            raise ValueError(f"train.prediction_type: {prediction_type!r} is a DDPM target; a FLUX model learns the "
                             f"flow-matching velocity: leave train.prediction_type unset")
        config = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler").config
        guided = component_config(Path(model_dir), self.denoiser).get("guidance_embeds", False)
        if train is None:
            return FlowMatchObjective(config, guidance=1.0 if guided else None)
        return FlowMatchObjective(config, train.timestep_sampling or "logit_normal", train.flow_shift, train.logit_mean,
                                  train.logit_std, train.guidance if guided else None)

    def sample_kwargs(self, pipe, sample_cfg, prompts: int) -> dict[str, Any]:
        """FluxPipeline's arguments: T5 at the length the cache encoded; a guidance-distilled model
        gets sample.guidance_scale as its guidance input, one without (schnell, the tiny builtin)
        true classifier-free guidance against the negative prompt (the empty caption it was trained
        to drop to by default)."""
        kwargs: dict[str, Any] = {"max_sequence_length": min(512, pipe.tokenizer_2.model_max_length)}
        if pipe.transformer.config.guidance_embeds:
            return kwargs | {"guidance_scale": sample_cfg.guidance_scale}
        return kwargs | {"true_cfg_scale": sample_cfg.guidance_scale, "negative_prompt": [sample_cfg.negative_prompt] * prompts}

    def set_sampler(self, pipe, name: str) -> None:
        if name not in ("auto", "euler", self.default_sampler):
            raise ValueError(f"sample.scheduler: {name!r} is a DDPM sampler; a FLUX model samples with its flow-matching "
                             f"Euler scheduler: sample.scheduler=auto (or euler)")

    def latent_multiple(self, model_dir: Path) -> int:
        return 2  # the transformer's 2x2 patches

    def native_resolution(self, model_dir: Path) -> int:
        """FLUX.1's VAE config names the image size (1024); the transformer's has none."""
        return int(component_config(Path(model_dir), "vae")["sample_size"])

    def build_tiny(self, out_dir: Path, images: torch.Tensor, captions: list[str], steps: int, batch: int, seed: int) -> dict:
        return build_tiny_flux(out_dir, images, captions, steps, batch, seed)

    def checkpoint_state_dict(self, model_dir: Path, dtype) -> dict:
        """The transformer alone in BFL's layout (flux1-dev.safetensors' keys, no prefix): what ComfyUI
        loads as a diffusion model and diffusers' FluxTransformer2DModel.from_single_file reads; the
        VAE and text encoders stay the base model's."""
        from .models import load_denoiser

        model = load_denoiser(model_dir)
        return {k: v.detach().to(dtype).contiguous() for k, v in to_bfl(model.state_dict(), dict(model.config)).items()}

    def kohya_lora_state_dict(self, lora_file: Path, base_dir: Path) -> tuple[dict, float, int]:
        from .export import read_lora_file

        weights, alpha, rank = read_lora_file(lora_file, self.denoiser)
        return kohya_lora(weights, component_config(Path(base_dir), self.denoiser), alpha), alpha, rank


# diffusers' examples/dreambooth/README_flux.md trains FLUX.1-dev LoRA at 1e-4 (AdamW); for a full
# fine-tune SD's full rate, 1e-5 (no FLUX figure of ours yet). Micro-batch 1 at 1024 px with every block
# recomputed: what a full fine-tune's activations leave room for on one card; not yet measured through
# the stage (issue 48's plain loop on one H100, LoRA rank 16: 46.9 GB at micro-batch 1 without
# recomputation, 31.6 GB at 4 with it).
FLUX_DEFAULTS = AutoDefaults(lr_full=1e-5, lr_lora=1e-4, lr_source="diffusers' README_flux (LoRA); SD's full rate",
                             micro_batch=1, reference_resolution=1024, gradient_checkpointing=True, compile=False,
                             cache_batch=8, parameters_b=11.9, lora_precision="bf16",
                             unmeasured="not yet measured through the stage: every block recomputed at micro-batch 1, "
                             "what a full fine-tune's activations leave room for on one card")

FLUX = FluxFamily("flux", "flux-1-dev", "https://github.com/black-forest-labs/flux",
                  (TextEncoderLayout("text_encoder", "tokenizer", "text_encoders.clip_l.transformer.", False,
                                     hidden_state=None, pooled="pooler"),
                   TextEncoderLayout("text_encoder_2", "tokenizer_2", "text_encoders.t5xxl.transformer.", False,
                                     tokenizer_class="T5Tokenizer", pad_token="<pad>")),
                  "flux", "flux1", "", "FluxPipeline", FLUX_DEFAULTS)
FAMILIES[FLUX.name] = FLUX
# flux-arch-DxS: FLUX.1-dev's shapes with D double- and S single-stream blocks (of 19 and 38), for what
# the whole 12 B model cannot show on one card (a full fine-tune's memory and time per block).
FLUX_ARCH_SLICES = {"builtin:flux-arch-2x4": (2, 4, 1.310), "builtin:flux-arch-4x8": (4, 8, 2.556)}
BUILTIN_FAMILIES |= {"builtin:tiny-flux": "flux", "builtin:flux-arch": "flux"} | dict.fromkeys(FLUX_ARCH_SLICES, "flux")
TINY_BUILTINS["builtin:tiny-flux"] = "flux"
ARCH_BUILTINS["builtin:flux-arch"] = "workflow.flux:build_flux_arch"
ARCH_BUILTINS |= {ref: f"workflow.flux:build_flux_arch_{ref.rsplit('-', 1)[1]}" for ref in FLUX_ARCH_SLICES}
SLICED_BUILTIN_PARAMETERS_B |= {ref: params for ref, (_, _, params) in FLUX_ARCH_SLICES.items()}
BUILTIN_RESOLUTIONS |= {"builtin:tiny-flux": 32, "builtin:flux-arch": 1024} | dict.fromkeys(FLUX_ARCH_SLICES, 1024)


# ---------------------------------------------------------------- builtins


def t5_tokenizer(corpus: list[str], max_length: int):
    """A T5 (sentencepiece unigram) tokenizer whose pieces are the captions' words and, for any
    other text, single characters, as T5's vocabulary backs off to them."""
    from transformers import T5Tokenizer

    words = sorted({w for text in corpus for w in text.split()})
    chars = sorted({c for text in corpus for c in text if not c.isspace()} | set("abcdefghijklmnopqrstuvwxyz0123456789.,"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words] + [(c, -5.0) for c in chars]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(9, -1, -1)]
    return T5Tokenizer(vocab=vocab, extra_ids=10, model_max_length=max_length)


def t5_encoder(tokenizer, **shape):
    """A T5 v1.1 encoder (gated GELU, as FLUX's T5-XXL) with random weights; `shape`: d_model, d_kv, d_ff,
    num_layers, num_heads."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), feed_forward_proj="gated-gelu", pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0, **shape))


def flow_scheduler():
    """FLUX.1-dev's scheduler settings (its resolution-dependent shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


# FLUX.1's VAE: SD's AutoencoderKL shape with 16 latent channels, no quant convs, its own scaling and shift;
# and T5-XXL's encoder (4.7 B).
FLUX_VAE = {"latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
            "use_quant_conv": False, "use_post_quant_conv": False}
T5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64}


def build_tiny_flux(out_dir: Path, images: torch.Tensor, captions: list[str], steps: int, batch: int, seed: int) -> dict:
    """builtin:tiny-flux: FLUX-shaped and small: a CLIP tokenizer and a T5 tokenizer learned on the
    captions, small CLIP (pooled) and T5 encoders, a 16-channel VAE fitted on the images (scaling and
    shift factors set so latents have zero mean, unit variance), a transformer of 2 double- and 2
    single-stream blocks, no guidance input (sampled with true classifier-free guidance)."""
    import torch
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    from .models import fit_vae, tiny_text_encoder, train_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = train_clip_tokenizer(captions)
    tokenizer_2 = t5_tokenizer(captions, max_length=16)
    resolution = images.shape[-1]
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8,
                        sample_size=resolution, use_quant_conv=False, use_post_quant_conv=False)
    report = fit_vae(vae, images, steps, batch, seed, center=True)
    text_encoder = tiny_text_encoder(tokenizer, 64)
    text_encoder_2 = t5_encoder(tokenizer_2, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                         attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                         pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=(8, 12, 12))
    FluxPipeline(scheduler=flow_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                 text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                 transformer=transformer).save_pretrained(out_dir, safe_serialization=True)
    return report


def build_flux_arch_2x4(out_dir: Path) -> dict:
    return build_flux_arch(out_dir, blocks=FLUX_ARCH_SLICES["builtin:flux-arch-2x4"][:2])


def build_flux_arch_4x8(out_dir: Path) -> dict:
    return build_flux_arch(out_dir, blocks=FLUX_ARCH_SLICES["builtin:flux-arch-4x8"][:2])


def build_flux_arch(out_dir: Path, seed: int = 0, blocks: tuple[int, int] = (19, 38)) -> dict:
    """builtin:flux-arch: FLUX.1-dev's architecture with random weights (benchmarks only): the 12 B
    transformer (bf16: 24 GB on disk), CLIP ViT-L, T5-XXL's encoder (4.7 B), the 16-channel VAE.
    `blocks`: double- and single-stream blocks (the slices' fewer)."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from .models import CLIP_L, clip_text_encoder, sd_vae, train_clip_tokenizer

    torch.manual_seed(seed)
    corpus = ["a photo of a cat", "a painting of a dog"]
    tokenizer = train_clip_tokenizer(corpus, max_length=77)
    tokenizer_2 = t5_tokenizer(corpus, max_length=512)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of 17 B weights: on the GPU
        text_encoder = clip_text_encoder(tokenizer, **CLIP_L).to(torch.bfloat16)
        text_encoder_2 = t5_encoder(tokenizer_2, **T5_XXL).to(torch.bfloat16)
        transformer = FluxTransformer2DModel(num_layers=blocks[0], num_single_layers=blocks[1],
                                             guidance_embeds=True).to(torch.bfloat16)
        vae = sd_vae(**FLUX_VAE)
    FluxPipeline(scheduler=flow_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                 text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                 transformer=transformer).save_pretrained(out_dir, safe_serialization=True)
    return {}


def write_config_folder(folder: Path) -> Path:
    """FLUX.1-dev's pipeline folder without weights: model_index.json, each component's config and
    the tokenizers (of this project's vocabularies). What a dry-run reads of a model folder; the
    configs are built on the meta device, so nothing of 17 B weights is allocated."""
    import json

    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, T5Config

    from .models import CLIP_L, sd_vae, train_clip_tokenizer

    corpus = ["a photo of a cat", "a painting of a dog"]
    tokenizer, tokenizer_2 = train_clip_tokenizer(corpus, max_length=77), t5_tokenizer(corpus, max_length=512)
    with torch.device("meta"):
        FluxTransformer2DModel(guidance_embeds=True).save_config(folder / "transformer")
        sd_vae(**FLUX_VAE).save_config(folder / "vae")
    CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, architectures=["CLIPTextModel"],
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, **CLIP_L).save_pretrained(folder / "text_encoder")
    T5Config(vocab_size=len(tokenizer_2), feed_forward_proj="gated-gelu", architectures=["T5EncoderModel"],
             **T5_XXL).save_pretrained(folder / "text_encoder_2")
    tokenizer.save_pretrained(folder / "tokenizer")
    tokenizer_2.save_pretrained(folder / "tokenizer_2")
    flow_scheduler().save_config(folder / "scheduler")
    index = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5Tokenizer"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder



# ---------------------------------------------------------------- export: Black Forest Labs' layout
# diffusers reads BFL's layout (single_file_utils.convert_flux_transformer_checkpoint_to_diffusers) but
# does not write it: the table is here, as data, inverted from that converter. Names without their
# .weight/.bias; each BFL tensor is the concatenation (dim 0) of the diffusers tensors listed.

BFL_TOP = {"time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
           "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
           "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
           "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
           "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
           "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
           "txt_in": ["context_embedder"], "img_in": ["x_embedder"], "final_layer.linear": ["proj_out"]}
BFL_DOUBLE = {"img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"],
              "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
              "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
              "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
              "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
              "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"]}
BFL_DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
BFL_SINGLE = {"modulation.lin": ["norm.linear"], "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
              "linear2": ["proj_out"]}
BFL_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
# BFL's final AdaLayerNorm computes (shift, scale), diffusers' (scale, shift): the halves swap.
BFL_SWAPPED = {"final_layer.adaLN_modulation.1": "norm_out.linear"}


def bfl_rows(config: dict) -> list[tuple[str, list[str]]]:
    """(BFL name, diffusers names) for every fused or renamed tensor of a transformer of `config`."""
    rows = [(b, d) for b, d in BFL_TOP.items()]
    for i in range(config["num_layers"]):
        rows += [(f"double_blocks.{i}.{b}", [f"transformer_blocks.{i}.{n}" for n in d]) for b, d in BFL_DOUBLE.items()]
    for i in range(config["num_single_layers"]):
        rows += [(f"single_blocks.{i}.{b}", [f"single_transformer_blocks.{i}.{n}" for n in d]) for b, d in BFL_SINGLE.items()]
    return rows


def to_bfl(state: dict, config: dict) -> dict:
    """A FluxTransformer2DModel state dict in BFL's layout (flux1-dev.safetensors' keys), every
    tensor accounted for: a diffusers key no row maps is an error, not a silently dropped weight."""
    import torch

    out, used = {}, set()
    for bfl, parts in bfl_rows(config):
        for kind in ("weight", "bias"):
            keys = [f"{p}.{kind}" for p in parts]
            if all(k in state for k in keys):
                out[f"{bfl}.{kind}"] = torch.cat([state[k] for k in keys])
                used.update(keys)
    norms = [(BFL_DOUBLE_NORMS, "double_blocks", "transformer_blocks", config["num_layers"]),
             (BFL_SINGLE_NORMS, "single_blocks", "single_transformer_blocks", config["num_single_layers"])]
    for table, bfl_block, block, count in norms:
        for i in range(count):
            for b, d in table.items():
                out[f"{bfl_block}.{i}.{b}"] = state[f"{block}.{i}.{d}"]
                used.add(f"{block}.{i}.{d}")
    for b, d in BFL_SWAPPED.items():
        for kind in ("weight", "bias"):
            scale, shift = state[f"{d}.{kind}"].chunk(2, dim=0)
            out[f"{b}.{kind}"] = torch.cat([shift, scale])
            used.add(f"{d}.{kind}")
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"FLUX transformer keys with no place in BFL's layout: {left[:5]}")
    return out


def kohya_lora(lora: dict, config: dict, alpha: float) -> dict:
    """diffusers-format FLUX LoRA (`transformer.<module>.lora_A/B.weight`) -> kohya sd-scripts' layout
    on BFL's modules (`lora_unet_double_blocks_0_img_attn_qkv.lora_down/lora_up/alpha`). A fused
    module (qkv, single blocks' linear1) gets the stacked downs and a block-diagonal up, so it applies
    exactly the separate adapters: diffusers' loader (_convert_kohya_flux_lora_to_diffusers) splits
    such a block-sparse pair back; a part without an adapter (proj_mlp when only attention trained)
    is a zero block. Rank: each part's rank times the number of parts."""
    import torch

    # either key form a LoRA file may hold (lora.down/up, lora_A/B) -> lora_A/B
    lora = {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v for k, v in lora.items()}
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in lora}
    out, used = {}, set()
    for bfl, parts in bfl_rows(config) + [(b, [d]) for b, d in BFL_SWAPPED.items()]:
        present = [p for p in parts if p in modules]
        if not present:
            continue
        if bfl in BFL_SWAPPED:
            raise ValueError(f"a LoRA on {parts[0]} (the final norm's modulation) has no exact kohya form")
        downs = {p: lora[f"transformer.{p}.lora_A.weight"] for p in present}
        ups = {p: lora[f"transformer.{p}.lora_B.weight"] for p in present}
        rank = next(iter(downs.values())).shape[0]
        like = next(iter(downs.values()))
        width = {p: config_width(p, config) for p in parts}
        down = torch.cat([downs.get(p, like.new_zeros(rank, like.shape[1])) for p in parts])
        up = like.new_zeros(sum(width.values()), rank * len(parts))
        row = 0
        for j, p in enumerate(parts):
            if p in ups:
                up[row : row + width[p], j * rank : (j + 1) * rank] = ups[p]
            row += width[p]
        name = "lora_unet_" + bfl.replace(".", "_")
        # the loader scales by alpha / rank: the fused rank is len(parts) x rank, so alpha scales with it
        out |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                f"{name}.alpha": torch.tensor(alpha * len(parts))}
        used.update(present)
    left = sorted(modules - used)
    if left:
        raise ValueError(f"FLUX LoRA modules with no place in kohya's layout: {left[:5]}")
    return out


def config_width(module: str, config: dict) -> int:
    """Output width of a fused part: the inner width, or the single blocks' MLP width."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    return int(inner * 4.0) if module.endswith("proj_mlp") else inner
