"""The experiment configuration: typed, documented, validated in one place.

`config.yaml` is the default experiment; every key below is documented there too. Snakemake and the
stage modules both go through `load_config`, so a bad key fails the same way everywhere: with the
key's dotted name and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .buckets import parse_size
from .fsutil import sha256_json
from .families import TINY_BUILTINS, declared_resolution, native_resolution  # TINY_BUILTINS: the Snakefile reads it here

DIGIT_PROMPTS = [f"a handwritten digit {d}" for d in range(10)]


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the key."""


# A value chosen for the model, data or hardware at hand (workflow/auto.py), shown by `snakemake -n -p`.
Auto = Literal["auto"]
AUTO = "auto"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PriorConfig(Section):
    source: str | None = Field(
        None, description="class/prior images (DreamBooth's prior preservation): any data.source form, or generate "
        "(sampled from the base model from `caption`, as DreamBooth does); null: none")
    caption: str | None = Field(None, description="data.caption for the prior images (e.g. 'a photo of a dog'); with "
                                "source generate, the prompt they are sampled from")
    count: int = Field(100, ge=1, description="source generate: how many images (DreamBooth's num_class_images)")
    seed: int = Field(0, description="source generate: image i is sampled with seed + i")
    loss_weight: float = Field(1.0, ge=0.0, description="the prior samples' per-sample losses are multiplied by it")
    share: float = Field(0.5, gt=0.0, lt=1.0, description="of every micro-batch: round(share x train.micro_batch) "
                         "prior samples (at least 1, at most micro_batch - 1), the rest the data set's")

    _known_scheme = field_validator("source")(lambda v: v if v == "generate" else known_scheme(v))

    @model_validator(mode="after")
    def _generate_needs_a_caption(self) -> "PriorConfig":
        if self.source == "generate" and not self.caption:
            raise ValueError("data.prior.source generate samples the prior images from data.prior.caption: set it to "
                             "the class, e.g. data__prior__caption=\"a photo of a dog\"")
        return self

    @property
    def generated(self) -> bool:
        return self.source == "generate"

    def per_micro_batch(self, micro_batch: int) -> int:
        return min(micro_batch - 1, max(1, round(self.share * micro_batch)))


class DataConfig(Section):
    source: str = Field("builtin:digits", description="builtin:digits | imagefolder:<dir> | hf:<id or path> | wds:<tars>")
    name: str | None = Field(None, description="dataset name used in paths; derived from source")
    shard_size: int = Field(1000, ge=1, description="samples per prepared shard (latent shards follow)")
    strict: bool = Field(False, description="fail on an undecodable or uncaptioned image instead of skipping it")
    caption_column: str | None = Field(None, description="caption column/key; default: 'text', else 'caption'")
    caption: str | None = Field(
        None, description="the caption of images without one (DreamBooth-style: 'a photo of sks dog'); with "
        "'{caption}' in it, a template each image's own caption is put into ('a photo of sks dog, {caption}')")
    image_column: str | None = Field(None, description="hf: image column; default 'image'")
    split: str = Field("train", description="hf: the split to use")
    prior: PriorConfig = PriorConfig()

    _known_scheme = field_validator("source")(lambda v: known_scheme(v))


def known_scheme(source: str | None) -> str | None:
    if source is not None and (":" not in source or source.split(":", 1)[0] not in DATA_SCHEMES):
        raise ValueError(f"unknown data source {source!r}; expected one of " + ", ".join(f"{s}:..." for s in DATA_SCHEMES))
    return source


DATA_SCHEMES = ("builtin", "imagefolder", "hf", "wds")


class TinyModelConfig(Section):
    vae_steps: int = Field(250, ge=0, description="optimizer steps fitting builtin:tiny's VAE on the data")
    vae_batch: int = Field(32, ge=1)
    seed: int = Field(0, description="seed for the random weights and the VAE fit")


class ModelConfig(Section):
    pretrained: str = Field("builtin:tiny", description="builtin:tiny | builtin:tiny-sd2 | builtin:tiny-xl | "
                            "builtin:sd15-arch | builtin:sdxl-arch | local diffusers folder (SD 1.x, 2.x or SDXL) | "
                            "single-file checkpoint (.safetensors, .ckpt) | Hub id")
    config_from: str | None = Field(
        None, description="single-file checkpoints: a diffusers folder of the same family whose component configs and "
        "tokenizers describe the checkpoint (e.g. a local stable-diffusion-v1-5); null: the project's configs for the "
        "family the checkpoint's keys show (workflow/single_file.py), tokenizers from open_clip_torch's CLIP vocabulary")
    name: str | None = Field(None, description="model name used in paths; derived from pretrained (and vae)")
    vae: str | None = Field(None, description="a VAE folder (diffusers AutoencoderKL: config.json + weights) used "
                            "instead of the model's, e.g. an fp16-fix VAE for SDXL")
    revision: str | None = Field(None, description="Hub revision for a Hub id")
    tiny: TinyModelConfig = TinyModelConfig()


class CacheConfig(Section):
    resolution: Annotated[int, Field(ge=8)] | Literal["auto"] = Field(
        "auto", description="images are resized + cropped to this square size (with buckets: their area); auto: the "
        "model's own (its UNet's sample size x the VAE's down-sampling: 512 for SD 1.5, 768 for SD 2.x-768, "
        "1024 for SDXL, 32 for the tiny builtins)")
    center_crop: bool = Field(True, description="center crop; false: a random crop drawn once per sample from train.seed")
    random_flip: bool = Field(False, description="also cache the horizontally flipped image; training picks one")
    buckets: Literal["auto"] | list[str] | None = Field(
        None, description="aspect-ratio buckets: null (square crops), auto (about resolution² pixels, sides on the "
        "model's latent step, aspect up to max_aspect) or a list of WxH sizes, e.g. [512x768, 768x512, 640x640]")
    max_aspect: float = Field(2.0, ge=1.0, description="the widest aspect ratio (long side / short side) of auto buckets")
    bucket_step: int | None = Field(None, ge=8, description="auto buckets' sides are multiples of this; null: the "
                                    "model's latent step (VAE x UNet down-sampling)")

    @field_validator("buckets")
    @classmethod
    def _bucket_sizes(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list: use null for no buckets")
            for size in v:
                parse_size(size)
            if len(set(v)) != len(v):
                raise ValueError(f"{v} lists a size twice")
        return v
    procs: int = Field(1, ge=1, description="caching processes on a machine without GPUs; with GPUs: one per GPU")
    batch_size: Annotated[int, Field(ge=1)] | Auto = Field(
        "auto", description="images per VAE forward; auto: the family's (workflow/families.py)")


# Top-level keys DeepSpeed reads. A key outside this list would be ignored without a word.
DEEPSPEED_KEYS = {
    "zero_optimization", "activation_checkpointing", "communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "wall_clock_breakdown", "memory_breakdown", "flops_profiler",
    "comms_logger", "steps_per_print", "dump_state", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "checkpoint", "data_types", "aio", "timers", "compile", "tensorboard", "csv_monitor", "wandb", "comet",
    "disable_allgather", "dataloader_drop_last", "gradient_allreduce_op", "log_level", "disable_python_gc",
    "seq_parallel_communication_data_type", "torch_autocast", "nebula", "elasticity",
}
# Set through train.* so that the fingerprint, the data stream and the checks see them.
OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch", "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch x train.grad_accum x ranks", "gradient_clipping": "train.max_grad_norm",
    "bf16": "train.precision", "fp16": "train.precision", "amp": "train.precision", "torch_autocast": "train.precision",
    "optimizer": "train.lr / train.weight_decay (AdamW)", "scheduler": "train.lr_schedule / train.warmup_steps",
}
OWNED_ZERO_KEYS = {"stage": "train.zero_stage", "offload_optimizer": "train.offload_optimizer",
                   "offload_param": "train.offload_params"}


def deepspeed_problems(raw: dict[str, Any], zero_stage: int, precision: str) -> list[str]:
    """Raw `train.deepspeed` values that DeepSpeed would take and then not act on."""
    problems = []
    for key in raw:
        if key in ("fp16", "bf16") and isinstance(raw[key], dict):
            # `enabled` is train.precision's; the rest tunes it (fp16: the loss scaler's
            # initial_scale_power, loss_scale_window, hysteresis, min_loss_scale)
            if "enabled" in raw[key]:
                problems.append(f"train.deepspeed.{key}.enabled: set train.precision instead")
            elif precision != key and not (precision == AUTO and key == "bf16"):  # auto: maybe bf16, never fp16
                problems.append(f"train.deepspeed.{key}: has no effect unless train.precision is {key} "
                                f"(it is {precision})")
        elif key in OWNED_KEYS:
            problems.append(f"train.deepspeed.{key}: set {OWNED_KEYS[key]} instead")
        elif key not in DEEPSPEED_KEYS:
            problems.append(f"train.deepspeed.{key}: not a DeepSpeed config key (DeepSpeed would ignore it)")
    zero = raw.get("zero_optimization", {})
    if not isinstance(zero, dict):
        problems.append("train.deepspeed.zero_optimization: expected a mapping")
        zero = {}
    for key in zero:
        if key in OWNED_ZERO_KEYS:
            problems.append(f"train.deepspeed.zero_optimization.{key}: set {OWNED_ZERO_KEYS[key]} instead")
        elif zero_stage == AUTO:
            if key.startswith("stage3_"):
                problems.append(f"train.deepspeed.zero_optimization.{key}: only used by ZeRO stage 3 (train.zero_stage "
                                f"is auto: 0 or 2)")
        elif zero_stage == 0:
            problems.append(f"train.deepspeed.zero_optimization.{key}: has no effect with train.zero_stage 0")
        elif key.startswith("stage3_") and zero_stage != 3:
            problems.append(f"train.deepspeed.zero_optimization.{key}: only used by ZeRO stage 3 "
                            f"(train.zero_stage is {zero_stage})")
    problems += [f"train.deepspeed.{path}: \"auto\" is only resolved by Hugging Face integrations; give a value"
                 for path in _auto_values(raw)]
    return problems


def _auto_values(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _auto_values(v, f"{path}.{k}" if path else str(k))]
    return [path] if node == "auto" else []



class LoraConfig(Section):
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; null: equal to rank (scale 1)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1,
                                      description="UNet module names that get adapters (default: attention projections)")


class WandbConfig(Section):
    enabled: bool = False
    project: str = "deepspeed-diffusers"
    group: str | None = None
    team: str | None = None
    mode: Literal["offline", "online"] = Field("offline", description="offline: written to <run>/monitor/wandb, sync later")


class TrainConfig(Section):
    mode: Literal["full", "lora"] = Field("full", description="full: every UNet weight; lora: peft adapters only")
    lora: LoraConfig = LoraConfig()
    steps: Annotated[int, Field(ge=1)] | Auto = Field(
        "auto", description="optimizer steps; auto: from train.epochs and the data set's size (the train stage counts "
        "it), or for the tiny builtins the demo's 19,200 samples")
    epochs: Annotated[float, Field(gt=0)] | Auto = Field(
        "auto", description="with train.steps auto: passes over the data set; auto: 100 (DreamBooth's ~100 steps per "
        "image), at most 100,000 samples in all")
    micro_batch: Annotated[int, Field(ge=1)] | Auto = Field(
        "auto", description="samples per rank per micro-step; auto: the family's for one 80 GB GPU at this resolution "
        "(a card recipe sets its own), 32 for the tiny builtins")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    lr: Annotated[float, Field(gt=0)] | Auto = Field(
        "auto", description="AdamW learning rate after warm-up; auto: the family's rate for full or LoRA training")
    lr_schedule: Literal["constant", "linear", "cosine"] | Auto = Field(
        "auto", description="after warm-up; linear/cosine decay to 0; auto: constant (the default run, builtin:tiny on "
        "the digits: cosine)")
    warmup_steps: Annotated[int, Field(ge=0)] | Auto = Field(
        "auto", description="linear LR warm-up, in optimizer steps; auto: a tenth of the steps, at most 100 (50 for the "
        "tiny builtins)")
    weight_decay: float = Field(1e-2, ge=0)
    precision: Literal["fp32", "bf16", "bf16-mixed", "fp16", "auto"] = Field(
        "auto", description="bf16: bf16 weights, fp32 masters in the optimizer; bf16-mixed: fp32 weights, the "
                            "forward under bf16 autocast; fp16: fp16 weights, dynamic loss scaling; auto: fp32 on the "
                            "CPU, bf16-mixed on one GPU (ZeRO-0), bf16 under ZeRO >= 1")
    zero_stage: Literal[0, 1, 2, 3, "auto"] = Field(
        "auto", description="DeepSpeed ZeRO stage; auto: 0 on one rank, 2 on several or with the optimizer offloaded")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="cpu: optimizer states + step on the CPU (ZeRO >= 1)")
    offload_params: Literal["none", "cpu"] = Field("none", description="cpu: parameters on the CPU between uses (ZeRO 3)")
    offload_optimizer_ratio: float = Field(
        1.0, gt=0, le=1, description="with offload_optimizer cpu and ZeRO 3: the share of the optimizer states "
        "(and their step) kept on the CPU, the rest updated on the GPU (DeepSpeed's partial offload, "
        "offload_optimizer.ratio); 1: all on the CPU")
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="raw DeepSpeed config keys, merged last")
    gradient_checkpointing: bool | list[str] | Auto = Field(
        "auto", description="recompute activations in backward instead of keeping them (less memory, more compute): "
        "true: every UNet block; a list of blocks, e.g. [down_blocks.0, up_blocks.3] (the high-resolution ones, "
        "which hold most activations): only those; the blocks are down_blocks.N, mid_block, up_blocks.N; auto: "
        "the family's (SDXL: true)")

    @field_validator("gradient_checkpointing")
    @classmethod
    def _block_names(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list: use false for no gradient checkpointing")
            bad = [name for name in v if not re.fullmatch(r"(down_blocks|up_blocks)\.\d+|mid_block", name)]
            if bad:
                raise ValueError(f"{bad} are not UNet blocks: expected down_blocks.N, mid_block or up_blocks.N")
            if len(set(v)) != len(v):
                raise ValueError(f"{v} names a block twice")
        return v
    memory_cap_gb: float | None = Field(
        None, gt=0, description="cap each rank's GPU memory at this many GiB (torch.cuda."
        "set_per_process_memory_fraction): a recipe for a smaller card runs out of memory here as it would "
        "there (config/cards/); null: the whole card")
    expandable_segments: bool = Field(
        False, description="PyTorch's caching allocator grows its segments instead of reserving fixed blocks "
        "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True): under a card's memory, free memory left in pieces "
        "between blocks can still serve a large request (config/cards/24gb.yaml needs it). GPU only")
    compile: bool | Auto = Field(
        "auto", description="torch.compile the UNet (GPU only: torch's CPU Inductor gives part of the UNet zero "
        "gradients, bench/compile_grads.py; the first steps compile, minutes); auto: on a GPU for the families measured "
        "faster compiled with matching gradients (SD 1.x/2.x), else off")
    activation_memory_budget: float | None = Field(
        None, gt=0, le=1, description="with train.compile: how much of the activations the compiled UNet keeps for "
        "backward, between 0 (recompute all it can) and 1 (keep what is fastest), through torch's "
        "torch._functorch.config.activation_memory_budget: Inductor's partitioner recomputes the ops that free "
        "the most bytes for the fewest FLOPs (norms, activations, other pointwise ops first) instead of whole "
        "blocks as train.gradient_checkpointing does; null: torch's default (1)")
    compile_scope: Literal["model", "blocks"] = Field(
        "model", description="with train.compile, what is compiled: model: the denoiser's whole forward (one "
        "graph: the fastest steady state measured for SD 1.5); blocks: each repeated block's forward (regional "
        "compilation: the classes diffusers lists in the model's _repeated_blocks, and a UNet's resnets), "
        "sibling blocks of one class and shape sharing a graph, so compiling costs one graph per block class and "
        "shape instead of the whole model (FLUX.1's 57 blocks: three graphs a shape, its first single-stream "
        "block seeing its input with other strides); what lies between the blocks runs eagerly")
    compile_shapes: Literal["auto", "dynamic", "per_bucket"] = Field(
        "per_bucket", description="with aspect-ratio buckets, how the compiled UNet meets several latent shapes: "
        "dynamic: one graph with symbolic sizes; per_bucket: one static graph per shape (Dynamo's recompile "
        "limit raised to fit them); auto: torch's default (static for the first shape, one dynamic recompile "
        "at the second)")
    compile_cache: str | None = Field(
        "resources/compile-cache", description="folder for Inductor's compiled graphs and kernels "
        "(TORCHINDUCTOR_CACHE_DIR), relative to the workflow folder: a rerun, a resume or another node on the "
        "same filesystem loads what an earlier run compiled; null: torch's default (/tmp, per machine)")
    procs: int = Field(2, ge=1, description="processes to start on a machine without GPUs")
    rendezvous_timeout_s: int = Field(
        300, ge=5, description="seconds rank 0 waits for every rank to arrive (and the others for rank 0): a node "
        "that failed to start stops the run with the missing ranks and their hosts named, not at the time limit")
    seed: int = 0
    val_samples: int | Literal["auto"] = Field(
        "auto", description="cached samples held out of training for the validation loss; auto: none below 100 "
        "samples, else 5 % up to 64")

    @field_validator("val_samples")
    @classmethod
    def _val_samples_not_negative(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError("must be 0 or more, or auto")
        return v
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="DDPM families' target; null: the scheduler's (flow-matching families: the velocity)")
    snr_gamma: float | None = Field(None, gt=0, description="min-SNR loss weighting gamma (5.0 is usual); null: off")
    timestep_sampling: Literal["uniform", "logit_normal"] | None = Field(
        None, description="flow-matching models (FLUX): how sigmas are drawn; null: logit_normal (SD3's, most FLUX "
        "trainers'); DDPM families draw timesteps uniformly")
    logit_mean: float = Field(0.0, description="logit_normal: the mean of the normal the sigmoid is taken of")
    logit_std: float = Field(1.0, gt=0, description="logit_normal: its standard deviation")
    flow_shift: float | None = Field(
        None, gt=0, description="flow-matching models: shift sigmas s -> k s / (1 + (k-1) s) by this k; null: as the "
        "model's scheduler samples (FLUX.1: resolution-dependent)")
    guidance: float = Field(1.0, ge=0, description="the guidance input a guidance-distilled model (FLUX.1-dev) "
                            "trains with (1.0, as most FLUX trainers); ignored for models without one")
    noise_offset: float = Field(0.0, ge=0)
    input_perturbation: float = Field(0.0, ge=0)
    caption_dropout: float = Field(0.1, ge=0, le=1, description="share of captions replaced by the null caption")
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    checkpoint_every: int = Field(200, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="newest complete checkpoints kept")
    resume: Literal["auto", "never"] = Field("auto", description="never: delete old checkpoints and start fresh")
    max_bad_steps: int = Field(10, ge=0, description="micro-steps with a non-finite loss skipped before stopping")
    skip_corrupt: bool = Field(False, description="skip (and count) a corrupt latent shard instead of stopping")
    log_every: int = Field(25, ge=1)
    profile_at: int | None = Field(None, ge=1, description="profile optimizer steps N+1..N+3 on rank 0 into "
                                   "<run>/profile/ (torch.profiler: per-op CPU and GPU time); null: off")
    wandb: WandbConfig = WandbConfig()

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainConfig":
        if self.steps != AUTO and self.epochs != AUTO:
            raise ValueError(f"train.steps ({self.steps}) and train.epochs ({self.epochs}) are both set: set one, the "
                             "other auto")
        return self

    @model_validator(mode="after")
    def _deepspeed_would_ignore(self) -> "TrainConfig":
        # DeepSpeed accepts these combinations and silently does nothing; say so instead. A value still
        # `auto` is checked where the answer does not depend on it (auto picks ZeRO 0 or 2, never 3,
        # and never fp16), the rest once it is resolved (workflow/auto.py validates the result again).
        zero = "auto (0 or 2)" if self.zero_stage == AUTO else self.zero_stage
        if self.offload_params == "cpu" and self.zero_stage != 3:
            raise ValueError(f"train.offload_params: cpu needs train.zero_stage 3 (got {zero})")
        if self.offload_optimizer == "cpu" and self.zero_stage == 0:
            raise ValueError("train.offload_optimizer: cpu needs train.zero_stage 1, 2 or 3 (got 0)")
        if self.offload_optimizer_ratio < 1 and (self.offload_optimizer != "cpu" or self.zero_stage != 3):
            # DeepSpeed reads the ratio in ZeRO-3 only: elsewhere the whole optimizer would stay offloaded
            raise ValueError(f"train.offload_optimizer_ratio: {self.offload_optimizer_ratio} needs "
                             f"train.offload_optimizer: cpu and train.zero_stage 3 (got {self.offload_optimizer}, "
                             f"{zero})")
        if self.activation_memory_budget is not None and self.compile is False:
            # torch reads the budget only when it partitions a compiled graph: eager it would do nothing
            raise ValueError(f"train.activation_memory_budget: {self.activation_memory_budget} needs train.compile: "
                             "true (it sets what the compiled graph recomputes)")
        problems = deepspeed_problems(self.deepspeed, self.zero_stage, self.precision)
        if problems:
            raise ValueError("\n".join(problems))
        return self


class PosthocConfig(Section):
    sigma_rels: list[float] = Field(default_factory=list, description="power-function EMA profiles tracked in "
                                    "training (Karras et al. 2024), e.g. [0.05, 0.10]; empty: off")
    snapshot_every: int = Field(100, ge=1, description="optimizer steps between snapshots of those EMAs")

    @field_validator("sigma_rels")
    @classmethod
    def _in_range(cls, v: list[float]) -> list[float]:
        bad = [s for s in v if not 0 < s < 0.28]
        if bad:
            raise ValueError(f"sigma_rel values must lie in (0, 0.28) (got {bad})")
        return v


class EmaConfig(Section):
    decay: float = Field(0.999, ge=0, lt=1, description="EMA decay per optimizer step")
    warmup: bool = Field(True, description="decay warms up as min(decay, (1 + step) / (10 + step))")
    offload: Literal["none", "cpu"] = Field("none", description="cpu: keep the EMA (this rank's shard) in host memory")
    posthoc: PosthocConfig = PosthocConfig()
    target_sigma_rel: float | None = Field(None, gt=0, lt=0.28, description="merge: the EMA reconstructed post hoc "
                                           "for this sigma_rel instead of the `decay` EMA")
    use: bool = Field(True, description="the merged model holds the EMA weights (else the raw ones)")
    fuse_lora: bool = Field(False, description="lora mode: also write the full model with the adapters fused in")

    @model_validator(mode="after")
    def _target_needs_snapshots(self) -> "EmaConfig":
        if self.target_sigma_rel is not None and not self.posthoc.sigma_rels:
            raise ValueError("ema.target_sigma_rel needs snapshots: set ema.posthoc.sigma_rels (e.g. [0.05, 0.10])")
        return self


class SampleConfig(Section):
    prompts: Annotated[list[str], Field(min_length=1)] | Auto = Field(
        "auto", description="one grid row each; auto: the ten digits for the digits data sets, else the captions of "
        "held-out images (up to 8; of training images when none is held out), each beside its image")
    seeds: list[int] = Field(default_factory=lambda: list(range(10)), min_length=1)
    negative_prompt: str = Field("", description="what guidance steers away from; empty: the unconditional caption")
    steps: int = Field(25, ge=1, description="denoising steps")
    guidance_scale: Annotated[float, Field(ge=0)] | Auto = Field(
        "auto", description="classifier-free guidance scale; auto: 4.0 (the default run: 1.25, where it keeps the "
        "digits' variety)")
    scheduler: Literal["auto", "ddim", "dpm++", "euler", "pndm"] = Field(
        "auto", description="auto: the family's (DDIM for SD 1.x/2.x/SDXL; FLUX's flow-matching Euler, its only one); "
        "dpm++: DPM-Solver++ multistep")
    resolution: int | str | list[int | str] | None = Field(
        None, description="image size(s): a side (square), WxH, or a list of them (each prompt x seed at each size); "
        "null: cache.resolution")

    @field_validator("resolution")
    @classmethod
    def _sample_sizes(cls, v):
        for size in v if isinstance(v, list) else [] if v is None else [v]:
            if isinstance(size, int) and size < 8:
                raise ValueError(f"{size!r} is not a size: a side of 8 or more, or WIDTHxHEIGHT such as 768x512")
            parse_size(size)
        return v

    def sizes(self, default: int) -> list[tuple[int, int]]:
        """The (width, height) sizes to sample at."""
        values = self.resolution if isinstance(self.resolution, list) else [self.resolution or default]
        return [parse_size(v) for v in values]
    batch_size: Annotated[int, Field(ge=1)] | Auto = Field(
        "auto", description="images per pipeline call; auto: what fits the card (recipe.card_gb, else the GPU's "
        "memory) by the family's measured sampling memory, 50 on the CPU")
    compare_base: bool = Field(False, description="also sample the base model, shown beside the fine-tuned one")
    checkpoints: list[int | Literal["last"]] = Field(default_factory=list, description="training steps to sample "
                                                     "as a checkpoint x prompt grid, e.g. [500, 1000, last]")
    val_timesteps: int = Field(8, ge=1, description="fixed timesteps per held-out sample in the validation loss")
    clip_model: str | None = Field(None, description="local CLIP model folder for a CLIP score and the samples' spread, precision "
                                    "and recall in CLIP's image space; null: skipped")
    prompt_digits: dict[str, int] = Field(
        default_factory=dict, description="the digit each listed prompt should draw when it names none, for "
        "digit_accuracy: a DreamBooth token's prompt, e.g. {'a photo of sks': 7}")

    @model_validator(mode="after")
    def _prompt_digits_are_prompts(self) -> "SampleConfig":
        if self.prompts == AUTO:
            return self
        unknown = [p for p in self.prompt_digits if p not in self.prompts]
        if unknown:
            raise ValueError(f"sample.prompt_digits names {unknown}, which sample.prompts does not list")
        return self


class ExportConfig(Section):
    formats: list[Literal["checkpoint", "kohya_lora"]] = Field(
        default_factory=lambda: ["checkpoint", "kohya_lora"],
        description="files for A1111/ComfyUI/InvokeAI, each where it applies: checkpoint (the whole pipeline in the "
                    "original single-file layout: full runs, fused LoRA runs), kohya_lora (LoRA runs); [] = none")
    dtype: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="weights dtype of the exported files")
    title: str | None = Field(None, description="modelspec.title shown by the tools; null: the run name")


class SlurmConfig(Section):
    """Resources the GPU rules ask for (used by `snakemake --profile profiles/slurm`; ignored locally
    except for the launch geometry). Partition, account and constraint are site settings: they live
    in the profile."""

    gpus_per_node: int = Field(1, ge=1, description="GPUs per node for cache and train (sample uses one)")
    nodes: int = Field(1, ge=1, description="nodes for train; ranks = nodes x gpus_per_node, one srun task each")
    cpus_per_gpu: int = Field(8, ge=1)
    mem_mb_per_gpu: int = Field(64000, ge=1)
    cache_minutes: int = Field(240, ge=1, description="time limit of the cache job")
    train_minutes: int = Field(1440, ge=1, description="time limit of one train job (it resumes when retried)")
    merge_minutes: int = Field(60, ge=1)
    sample_minutes: int = Field(60, ge=1)
    signal_seconds: int = Field(300, ge=0, description="train gets SIGUSR1 this long before its time limit, "
                                "saves and exits 75; 0: no signal")


class RecipeConfig(Section):
    """What a card recipe (config/cards/*.yaml) was measured for. Set by the recipe file: its settings are
    measured together, so a later config file may not change them (an error names both files), and a
    model or resolution it was not measured for is refused."""

    name: str | None = Field(None, description="the recipe, e.g. 24gb; null: none (the defaults are for one 80 GB GPU)")
    card_gb: float | None = Field(None, gt=0, description="the card memory (GB) it fits; null: 80")
    families: list[str] = Field(default_factory=list, description="the model families it was measured for; empty: any")
    max_resolution: int | None = Field(None, ge=8, description="the largest cache.resolution it was measured at")


DEFAULT_CARD_GB = 80  # what the auto settings without a card recipe were measured on (H100 80GB, H200)


class Config(Section):
    run: str = Field("auto", description="run name: results/runs/<run>/; auto: <data>-<model>, -lora for LoRA")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    train: TrainConfig = TrainConfig()
    ema: EmaConfig = EmaConfig()
    sample: SampleConfig = SampleConfig()
    export: ExportConfig = ExportConfig()
    slurm: SlurmConfig = SlurmConfig()
    recipe: RecipeConfig = RecipeConfig()

    @field_validator("run")
    @classmethod
    def _safe_run_name(cls, v: str) -> str:
        if v != AUTO and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"run name {v!r} must be letters, digits, '.', '_' or '-'")
        return v

    # --- derived names (paths are built from these in rules/common.smk and the stages) ---
    @model_validator(mode="after")
    def _sampled_checkpoints_exist(self) -> "Config":
        t = self.train
        if t.steps == AUTO:  # the train stage counts the steps: only the cadence can be checked here
            bad = [s for s in self.sample.checkpoints if s != "last" and s % t.checkpoint_every]
        else:
            bad = [s for s in self.sample.checkpoints
                   if s != "last" and (s > t.steps or (s % t.checkpoint_every and s != t.steps))]
        if bad:
            raise ValueError(f"sample.checkpoints: {bad} are not checkpoint steps (multiples of "
                             f"train.checkpoint_every {t.checkpoint_every} up to train.steps {t.steps}, or 'last')")
        return self

    @model_validator(mode="after")
    def _prior_fits(self) -> "Config":
        if self.data.prior.source:
            if self.train.micro_batch != AUTO and self.train.micro_batch < 2:
                raise ValueError("data.prior needs train.micro_batch >= 2: every micro-batch mixes data set and prior "
                                 "samples")
            if self.cache.buckets:
                raise ValueError("data.prior with cache.buckets is not supported: a micro-batch of both would mix "
                                 "bucket shapes; use square crops (cache.buckets: null)")
        return self

    @property
    def data_name(self) -> str:
        """The data set's own name: data.name, or the source's."""
        return self.data.name or slug(self.data.source)

    @property
    def prepared_name(self) -> str:
        """results/data/<this>: the data set, with the prior source's name when prepare makes the prior
        images too (the folder holds both). Generated prior images have their own folder (prior_dir)."""
        prior = self.data.prior
        return f"{self.data_name}+prior-{slug(prior.source)}" if prior.source and not prior.generated else self.data_name

    @property
    def dataset_name(self) -> str:
        """What the latent cache is made of, as a folder name: the prepared data, and the generated prior
        images' key when there are some."""
        if self.data.prior.generated:
            return f"{self.data_name}+prior-generated-{sha256_json(self.prior_settings())[:8]}"
        return self.prepared_name

    def prior_settings(self) -> dict[str, Any]:
        """What generated prior images depend on, besides the model (their folder is per model)."""
        p, s = self.data.prior, self.sample
        return {"caption": p.caption, "count": p.count, "seed": p.seed, "resolution": self.cache.resolution,
                "steps": s.steps, "guidance_scale": s.guidance_scale, "scheduler": s.scheduler,
                "negative_prompt": s.negative_prompt}

    @property
    def prior_dir_name(self) -> str:
        """results/prior/<model_name>/<this>: generated prior images, named by their caption and count."""
        p = self.data.prior
        return f"{slug(p.caption or 'prior')[:40]}-n{p.count}-s{p.seed}-{sha256_json(self.prior_settings())[:8]}"

    @property
    def auto_run_name(self) -> str:
        """run: auto -> <data>-<model>, with -lora for a LoRA run: a real run never lands in the demo's folder."""
        model = self.model.name or re.sub(r"\.(safetensors|ckpt)$", "", slug(self.model.pretrained))
        return f"{self.data_name}-{model}" + ("-lora" if self.train.mode == "lora" else "")

    @property
    def model_name(self) -> str:
        if self.model.name:
            return self.model.name
        if self.model.pretrained in TINY_BUILTINS:  # fitted on this dataset, so named after it
            name = f"{slug(self.model.pretrained)}-{self.dataset_name}"
        else:
            name = slug(self.model.pretrained)
        return f"{name}+{slug(self.model.vae)}" if self.model.vae else name

    def at_model_resolution(self, model_dir: str | Path) -> "Config":
        """This config with cache.resolution a number: `auto` becomes the model folder's own. The
        stages that size images (cache, sample, export) call it first."""
        if isinstance(self.cache.resolution, int):
            return self
        cache = self.cache.model_copy(update={"resolution": native_resolution(model_dir)})
        return self.model_copy(update={"cache": cache})

    @property
    def encoder_key(self) -> str:
        """The latent cache's folder name: model, resolution and buckets (a list by a short hash)."""
        res = self.cache.resolution
        if res == "auto":  # the number where it is known now, so that the folder says it
            res = declared_resolution(self.model.pretrained) or "auto"
        key = f"{self.model_name}_{res}px"
        buckets = self.cache.buckets
        if buckets == "auto":
            return f"{key}_auto{self.cache.max_aspect:g}" + (f"s{self.cache.bucket_step}" if self.cache.bucket_step else "")
        if buckets:
            return f"{key}_b" + hashlib.sha256(",".join(buckets).encode()).hexdigest()[:8]
        return key


def slug(source: str) -> str:
    """A short, path-safe name for a data source or model reference."""
    body = source.split(":", 1)[1] if ":" in source and not Path(source).exists() else source
    path = Path(body.rstrip("/"))
    name = path.name or body
    if name == "model" and path.parent.name:  # a run's merged model, results/runs/<run>/model: the run names it
        name = f"{path.parent.name}-model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "default"


# Which config sections each stage reads. Rules pass only these (as params), so changing
# `train.steps` reruns train and what follows, but not prepare or cache.
STAGE_KEYS: dict[str, list[str]] = {
    "prepare": ["data"],
    "fetch_model": ["data", "model"],
    "prior_images": ["data.prior", "model", "cache.resolution", "sample.steps", "sample.guidance_scale",
                     "sample.scheduler", "sample.negative_prompt", "sample.batch_size", "train.memory_cap_gb"],
    "cache": ["data", "model", "cache", "train.seed"],
    "train": ["run", "data", "model", "cache", "train", "ema.decay", "ema.warmup", "ema.offload", "ema.posthoc",
              "sample.checkpoints", "recipe"],  # kept from pruning
    "ema": ["run", "data", "model", "cache", "train", "ema"],
    "sample": ["run", "data", "model", "cache", "train", "ema", "sample", "recipe"],
    "export": ["run", "data", "model", "cache", "train", "ema", "export"],
}


def stage_config(cfg: Config, stage: str) -> dict[str, Any]:
    """The sections (or single dotted keys) that `stage` reads, as a nested dict."""
    full = cfg.model_dump(mode="json")
    out: dict[str, Any] = {}
    for path in STAGE_KEYS[stage]:
        *parents, leaf = path.split(".")
        src, dst = full, out
        for p in parents:
            src, dst = src[p], dst.setdefault(p, {})
        dst[leaf] = src[leaf]
    if stage == "cache" and cfg.cache.center_crop:
        del out["train"]  # the seed only places random crops: a new seed alone must not recache
    if stage == "fetch_model" and cfg.model.pretrained not in TINY_BUILTINS:
        del out["data"]  # only the tiny builtins are fitted on the data: another data set reuses the model
    elif stage in ("prepare", "fetch_model") and cfg.data.prior.generated:
        out["data"]["prior"] = PriorConfig().model_dump(mode="json")  # generated by prior_images, not prepared
    return out


def nest_dotted(flat: dict[str, Any]) -> dict[str, Any]:
    """{'train.steps': 10} -> {'train': {'steps': 10}}; nested dicts are merged, not replaced.

    `__` nests too: Snakemake's --config only accepts identifier-like keys, so there the
    override is written `train__steps=10`. A flattened key always beats the nested value it
    names, whatever the dict's order: Snakemake hands over `--config` keys *before* the sections
    of config.yaml (it starts from the overrides, then merges the config file into them)."""
    out: dict[str, Any] = {}
    depth = {key: key.replace("__", ".").count(".") for key in flat}
    for key in sorted(flat, key=depth.__getitem__):  # stable: sections first, then a.b, then a.b.c
        value = flat[key] if not depth[key] else command_line_nulls(flat[key])
        parts = key.replace("__", ".").split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"config key {key!r}: {p!r} is not a section")
            node = nxt
        if isinstance(value, dict):
            value = nest_dotted(value)
            if isinstance(node.get(parts[-1]), dict):
                value = deep_merge(node[parts[-1]], value)
        node[parts[-1]] = value
    return out


YAML_NULLS = {"null", "Null", "NULL", "~"}


def command_line_nulls(value: Any) -> Any:
    """Snakemake parses `--config key=null` (and the items of `[0, null]`) with YAML's base loader,
    which keeps `null` a string; in a flattened key it means YAML's null, as it would in a file."""
    if isinstance(value, str):
        return None if value in YAML_NULLS else value
    if isinstance(value, list):
        return [command_line_nulls(v) for v in value]
    if isinstance(value, dict):
        return {k: command_line_nulls(v) for k, v in value.items()}
    return value


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings (values parsed as YAML, so 10 is an int and [1,2] a list)."""
    flat = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        flat[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return flat


# Keys earlier versions took: a config that still sets one is told why it went.
REMOVED_KEYS = {"train.channels_last": "removed (measured slower on an H200, and DeepSpeed's ZeRO-0 weight broadcast "
                                       "fails on channels-last weights); delete the key"}
# Names other trainers (diffusers' examples, kohya's sd-scripts) give these settings.
OTHER_TOOLS_NAMES = {
    "learning_rate": "train.lr", "lr_scheduler": "train.lr_schedule", "lr_warmup_steps": "train.warmup_steps",
    "max_train_steps": "train.steps", "num_train_epochs": "train.epochs", "max_train_epochs": "train.epochs",
    "train_batch_size": "train.micro_batch", "batch_size": "train.micro_batch",
    "gradient_accumulation_steps": "train.grad_accum", "mixed_precision": "train.precision",
    "resolution": "cache.resolution", "rank": "train.lora.rank", "lora_rank": "train.lora.rank",
    "network_dim": "train.lora.rank", "network_alpha": "train.lora.alpha", "lora_alpha": "train.lora.alpha",
    "pretrained_model_name_or_path": "model.pretrained", "dataset_name": "data.source", "train_data_dir": "data.source",
    "instance_data_dir": "data.source", "instance_prompt": "data.caption", "class_prompt": "data.prior.caption",
    "class_data_dir": "data.prior.source", "num_class_images": "data.prior.count",
    "prior_loss_weight": "data.prior.loss_weight", "validation_prompt": "sample.prompts", "seed": "train.seed",
    "use_ema": "ema.use", "ema_decay": "ema.decay", "center_crop": "cache.center_crop",
    "random_flip": "cache.random_flip", "gradient_checkpointing": "train.gradient_checkpointing",
    "max_grad_norm": "train.max_grad_norm", "checkpointing_steps": "train.checkpoint_every",
    "snr_gamma": "train.snr_gamma", "noise_offset": "train.noise_offset", "output_dir": "run",
}


def all_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config (sections and leaves)."""
    model = model or Config
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += all_keys(field.annotation, f"{key}.")
    return keys


def did_you_mean(key: str) -> str:
    """' (did you mean train.lr?)' for an unknown key: another trainer's name for it, or a close spelling."""
    import difflib

    leaf = key.rsplit(".", 1)[-1]
    if leaf in OTHER_TOOLS_NAMES:
        return f"; did you mean {OTHER_TOOLS_NAMES[leaf]}?"
    keys = all_keys()
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [k for k in keys if k.startswith(section) and k.count(".") == key.count(".")]
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6) or difflib.get_close_matches(
        leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.75)
    if not close:
        return ""
    guess = close[0] if "." in close[0] or not section else next(k for k in keys if k.rsplit(".", 1)[-1] == close[0])
    return f"; did you mean {guess if '.' in guess or not section else section + guess}?"


def _field_path(loc: tuple) -> tuple[str, ...]:
    """The config key an error is about: `loc` up to the leaf field, without the union-member tags and
    list indices pydantic appends (('train', 'steps', 'int') -> ('train', 'steps'))."""
    path: list[str] = []
    model: type[BaseModel] | None = Config
    for part in loc:
        if model is None:
            break
        if part not in model.model_fields:
            path.append(str(part))  # an unknown key, named as written
            break
        path.append(part)
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return tuple(path)


def _source_of(key: tuple[str, ...], layers: list[tuple[str, dict]]) -> str | None:
    """The last layer (file, or --config) that sets `key`."""
    for origin, layer in reversed(layers):
        node: Any = layer
        for part in key:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return origin
    return None


def _list_hint(key: str, value: Any) -> str:
    if isinstance(value, str):
        flat = key.replace(".", "__")
        return f"; a list on the command line is written {flat}='[\"{value}\"]' (YAML: [{value}])"
    return ""


def describe_errors(e: ValidationError, layers: list[tuple[str, dict]]) -> list[str]:
    """One line per bad key: what was expected, what was given, where it came from, a suggestion."""
    grouped: dict[tuple[str, ...], dict] = {}
    lines = []
    for err in e.errors():
        if err["type"] == "value_error" and isinstance(err.get("input"), dict):
            # A check across several keys of a section: its message names the keys.
            lines += [f"  {problem}" for problem in str(err["ctx"]["error"]).split("\n")]
            continue
        path = _field_path(err["loc"])
        entry = grouped.setdefault(path, {"msgs": [], "input": err.get("input"), "types": set()})
        entry["types"].add(err["type"])
        msg = err["msg"]
        if msg not in entry["msgs"]:
            entry["msgs"].append(msg)
    for path, entry in grouped.items():
        key = ".".join(path) or "<root>"
        source = _source_of(path, layers)
        where = f" [{source}]" if source and len(layers) > 1 else ""
        if "extra_forbidden" in entry["types"]:
            msg = REMOVED_KEYS.get(key) or "unknown key" + did_you_mean(key)
        else:
            msgs = entry["msgs"]
            if len(msgs) > 1:  # a union: 'auto' or a number, ...
                msg = "expected " + " or ".join(m.removeprefix("Input should be ").removeprefix("Value error, ")
                                                 for m in msgs)
            else:
                msg = msgs[0]
            if "list_type" in entry["types"]:
                msg += _list_hint(key, entry["input"])
        got = "" if entry["types"] == {"missing"} else f" (got {entry['input']!r})"
        lines.append(f"  {key}: {msg}{got}{where}")
    return lines


def validate_layers(layers: list[tuple[str, dict[str, Any]]]) -> Config:
    """Config layers (origin, raw dict) laid over each other in order, later ones winning key by key;
    errors name the key and, with several layers, the layer that set it."""
    nested = [(origin, nest_dotted(raw or {})) for origin, raw in layers]
    check_recipe_layers(nested)
    merged: dict[str, Any] = {}
    for _, layer in nested:
        merged = deep_merge(merged, layer)
    try:
        return Config.model_validate(merged)
    except ValidationError as e:
        origin = " + ".join(o for o, _ in layers) or "config"
        raise ConfigError(f"invalid config ({origin}):\n" + "\n".join(describe_errors(e, nested))) from None


def check_recipe_layers(layers: list[tuple[str, dict[str, Any]]]) -> None:
    """A card recipe's settings were measured together: two recipes in one run, or a later config file
    changing one of its keys, would run something nobody measured. (`--config` may: that is the user
    asking for it by name.)"""
    recipe_layers = [(i, origin, layer) for i, (origin, layer) in enumerate(layers)
                     if isinstance(layer.get("recipe"), dict) and layer["recipe"].get("name")]
    if len(recipe_layers) > 1:
        names = ", ".join(f"{origin} ({layer['recipe']['name']})" for _, origin, layer in recipe_layers)
        raise ConfigError(f"two card recipes in one run: {names}; each is complete for its card, use one")
    for i, origin, layer in recipe_layers:
        keys = set(_leaf_keys(layer)) - {k for k in _leaf_keys(layer) if k.startswith("recipe.")}
        for later_origin, later in layers[i + 1:]:
            if later_origin.startswith("--"):
                continue
            changed = sorted(k for k in _leaf_keys(later) if k in keys and _get(later, k) != _get(layer, k))
            if changed:
                raise ConfigError(f"{later_origin} changes {', '.join(changed)} of the card recipe {origin}, whose "
                                  f"settings were measured together: list {origin} last, or set the key with --config")


def _leaf_keys(node: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        key = f"{prefix}{k}"
        out += _leaf_keys(v, f"{key}.") if isinstance(v, dict) and v else [key]
    return out


def _get(node: dict, key: str) -> Any:
    for part in key.split("."):
        node = node[part]
    return node


def validate(raw: dict[str, Any], origin: str = "config") -> Config:
    return validate_layers([(origin, raw)])


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML config file; a missing file or a YAML error names the file (and the line)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + removed_file_hint(path))
    try:
        layer = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(layer, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return layer


# Config files earlier versions shipped: a command that still names one is told what replaced it.
REMOVED_FILES = {
    "gpu.yaml": "GPU settings are chosen for the model and GPUs now (train.precision, zero_stage, micro_batch, "
                "compile, lr: auto; docs/gpus.md): drop the file, or use a card recipe from config/cards/",
    "one-gpu.yaml": "one GPU gets ZeRO-0 with bf16 autocast by itself now (train.zero_stage, train.precision: auto): "
                    "drop the file",
    "sdxl.yaml": "an SDXL model gets its settings by itself now (resolution, micro-batch, gradient checkpointing: "
                 "auto): drop the file; cache__buckets=auto for aspect-ratio buckets",
}


def removed_file_hint(path: Path) -> str:
    hint = REMOVED_FILES.get(path.name) if path.parent.name == "config" else None
    return f": {path.name} was removed; {hint}" if hint else ""


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config from a YAML file or an inline JSON object, then apply `key=value` overrides."""
    if source is not None and str(source).lstrip().startswith("{"):
        return validate_layers([("--config", json.loads(str(source))), ("--set", parse_overrides(overrides or []))])
    return load_config_files([] if source is None else [Path(source)], overrides)


def load_config_files(paths: list[Path], overrides: list[str] | None = None) -> Config:
    """YAML config files laid over each other in order (sections merge key by key, later files win,
    as with Snakemake's `--configfile a b`), then `key=value` overrides."""
    layers = [(str(path), read_config_file(path)) for path in paths]
    return validate_layers(layers + [("--set", parse_overrides(overrides or []))])
