"""`auto` settings: the values that depend on the model, the data or the hardware, chosen for them.

The Snakefile resolves them when it reads the workflow (so `snakemake -n -p` shows the value each
stage gets, and the rules' params change when the choice does); a stage run by hand resolves what is
still `auto` the same way, for its own hardware and model folder. Two need the data and are resolved
by their stage: `train.steps` (from the data set's size) and `sample.prompts` (from its captions).

| key | resolves to |
|---|---|
| run | <data>-<model>, with -lora for LoRA runs |
| train.lr | the family's rate for full or LoRA training (families.py, with its source); the tiny builtins': 2e-3 |
| train.precision | fp32 on the CPU; bf16-mixed on one GPU under ZeRO-0; bf16 under ZeRO >= 1 |
| train.zero_stage | 0 on one rank (or CPU ranks); 2 on several GPUs, or with the optimizer offloaded |
| train.micro_batch | the family's for one 80 GB GPU, scaled by pixels to the resolution; 32 for the tiny builtins |
| train.gradient_checkpointing | the family's (SDXL: every block) |
| train.compile | on a GPU where the family was measured compiled (SD 1.x/2.x); off on the CPU |
| cache.batch_size | the family's |
| sample.batch_size | what fits the card by the family's measured sampling memory; 50 on the CPU |
| train.lr_schedule | constant; the default run (builtin:tiny on builtin:digits): cosine |
| sample.guidance_scale | 4.0; the default run (builtin:tiny on builtin:digits): 1.25 (docs/sampling.md) |
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import AUTO, DEFAULT_CARD_GB, TINY_BUILTINS, Config, ConfigError, validate_layers
from .families import DEMO_DEFAULTS, FAMILIES, SLICED_BUILTIN_PARAMETERS_B, TINY_DEFAULTS, AutoDefaults, Family
from .gpus import visible_gpus

CPU_SAMPLE_BATCH = 50  # the CPU demo's: 100 tiny images in two pipeline calls


@dataclass(frozen=True)
class Hardware:
    """Where training runs: its ranks, whether they are GPUs, and (where known) a GPU's memory."""

    ranks: int
    gpu: bool
    gpu_memory_gb: float | None = None
    where: str = ""

    @classmethod
    def slurm(cls, cfg: Config) -> "Hardware":
        """A Slurm submission: the GPUs config.yaml's slurm section asks for (the login node has none)."""
        s = cfg.slurm
        return cls(s.nodes * s.gpus_per_node, True, None, f"Slurm: {s.nodes} node(s) x {s.gpus_per_node} GPU(s)")

    @classmethod
    def this_machine(cls, cfg: Config) -> "Hardware":
        """This machine, counted without importing torch (the Snakefile asks at read time)."""
        gpus = visible_gpus()
        if not gpus:
            return cls(cfg.train.procs, False, None, f"this machine, no GPU: {cfg.train.procs} CPU rank(s)")
        memory = gpu_memory_gb()
        return cls(gpus, True, memory, f"this machine: {gpus} GPU(s)" + (f" of {memory:.0f} GB" if memory else ""))

    @classmethod
    def this_process(cls, cfg: Config) -> "Hardware":
        """What a stage process sees (torch): the ranks of its run (WORLD_SIZE when launched), GPUs or CPU."""
        import torch

        if torch.cuda.is_available():
            ranks = int(os.environ.get("WORLD_SIZE") or torch.cuda.device_count())
            memory = torch.cuda.get_device_properties(0).total_memory / 2**30
            return cls(ranks, True, memory, f"{ranks} GPU rank(s) of {memory:.0f} GB")
        ranks = int(os.environ.get("WORLD_SIZE") or cfg.train.procs)
        return cls(ranks, False, None, f"{ranks} CPU rank(s)")


def gpu_memory_gb() -> float | None:
    """The smallest visible GPU's memory in GiB (nvidia-smi's MiB / 1024: an "80 GB" H100 has 79.6, a
    "24 GB" RTX 4090 24.0, the sizes cards are sold by), or None."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "--query-gpu=memory.total", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=20).stdout
        sizes = [float(line.strip()) / 1024 for line in out.splitlines() if line.strip()]
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return min(sizes) if sizes else None


@dataclass(frozen=True)
class Choice:
    key: str
    value: Any
    why: str


def defaults_for(cfg: Config, family: Family | None) -> AutoDefaults | None:
    """The tiny builtins keep the CPU demo's settings; other models their family's; None: not known yet."""
    if (cfg.model.pretrained, cfg.data.source) == ("builtin:tiny", "builtin:digits"):  # the default run's: measured
        return DEMO_DEFAULTS                                                          # for accuracy and spread
    if cfg.model.pretrained in TINY_BUILTINS:
        return TINY_DEFAULTS
    if family and cfg.model.pretrained in SLICED_BUILTIN_PARAMETERS_B:
        return replace(family.defaults, parameters_b=SLICED_BUILTIN_PARAMETERS_B[cfg.model.pretrained])
    return family.defaults if family else None


def resolve(cfg: Config, hw: Hardware, family: Family | None, resolution: int | None = None
            ) -> tuple[Config, list[Choice]]:
    """`cfg` with every `auto` that `hw` and `family` decide replaced by its value, and what was chosen
    why. Family-dependent keys stay `auto` when the family is unknown (a Hub id before its download):
    the stages resolve those from the model folder. The result is validated again as a whole."""
    chosen: list[Choice] = []
    d = defaults_for(cfg, family)
    t = cfg.train
    update: dict[str, dict[str, Any]] = {"train": {}, "cache": {}, "sample": {}}
    tiny = d in (TINY_DEFAULTS, DEMO_DEFAULTS)
    family_name = ("the default run" if d is DEMO_DEFAULTS else "the tiny builtins") if tiny else (family.name if family else "")

    def choose(section: str | None, key: str, value: Any, why: str) -> None:
        if section is None:
            update[key] = value
        else:
            update[section][key] = value
        chosen.append(Choice(f"{section}.{key}" if section else key, value, why))

    if cfg.run == AUTO:
        choose(None, "run", cfg.auto_run_name, "<data>-<model>" + ("-lora" if t.mode == "lora" else ""))
    if cfg.cache.resolution == AUTO and resolution:
        choose("cache", "resolution", resolution, "the model's own: its UNet's sample size x the VAE's down-sampling")

    zero = t.zero_stage
    if zero == AUTO:
        offloaded = t.offload_optimizer == "cpu"
        zero = 2 if hw.gpu and (hw.ranks > 1 or offloaded) else (2 if offloaded else 0)
        choose("train", "zero_stage", zero, f"{hw.where}: " + (
            "ZeRO-2 shards gradients and optimizer states across GPUs (measured 0.98x linear on two)" if zero and not offloaded
            else "the optimizer on the CPU needs ZeRO >= 1" if zero else
            "one rank has nothing to shard" if hw.gpu else "the CPU demo's ranks"))
    precision = t.precision
    if t.precision == AUTO:
        precision = "fp32" if not hw.gpu else ("bf16-mixed" if zero == 0 else "bf16")
        lora_base = hw.gpu and t.mode == "lora" and d is not None and d.lora_precision
        if lora_base:
            precision = d.lora_precision
        choose("train", "precision", precision, f"{hw.where}: " + (
            f"{family_name} LoRA: the frozen base in {precision}, as its trainers hold it" if lora_base else {
                "fp32": "the CPU has no fast bf16 everywhere (oneDNN differs by CPU)",
                "bf16-mixed": "ZeRO-0 on fp32 weights with bf16 autocast: the fastest on one GPU (BENCHMARKS.md)",
                "bf16": "bf16 weights, fp32 masters in DeepSpeed's optimizer (measured with ZeRO-2)"}[precision]))
    if hw.gpu and d is not None and d.parameters_b:
        check_states_fit(cfg, hw, d, zero, precision)
    if t.compile == AUTO and (not hw.gpu or d is not None):
        on = hw.gpu and d.compile
        choose("train", "compile", on, "torch's CPU Inductor zeroes part of the UNet's gradients" if not hw.gpu else
               f"{family_name}: " + ("measured faster compiled, gradients checked (bench/compile_grads.py)" if on else
                                     "not measured compiled (or its compiled gradients differ)"))
    if d is not None:
        if t.lr == AUTO:
            lr = d.lr_lora if t.mode == "lora" else d.lr_full
            choose("train", "lr", lr, f"{family_name} {t.mode}: {d.lr_source}")
        if t.lr_schedule == AUTO:
            choose("train", "lr_schedule", d.lr_schedule, f"{family_name}: " + (
                "decaying to 0 drew more varied digits at the same accuracy (docs/sampling.md)"
                if d.lr_schedule == "cosine" else "diffusers' training scripts' default"))
        if cfg.sample.guidance_scale == AUTO:
            choose("sample", "guidance_scale", d.guidance_scale, f"{family_name}: " + (
                "the digits' accuracy kept with their variety (docs/sampling.md)" if d is DEMO_DEFAULTS
                else "this project's default"))
        if t.gradient_checkpointing == AUTO:
            choose("train", "gradient_checkpointing", d.gradient_checkpointing, f"{family_name}: " + (
                d.unmeasured or f"measured with it {'on' if d.gradient_checkpointing else 'off'} at its micro-batch"))
        if cfg.cache.batch_size == AUTO:
            choose("cache", "batch_size", d.cache_batch, f"{family_name}: images per VAE forward")
        res = cfg.cache.resolution if cfg.cache.resolution != AUTO else resolution
        if t.micro_batch == AUTO and (res or tiny):
            mb = d.micro_batch if tiny else scaled_micro_batch(d, res)
            choose("train", "micro_batch", mb, "the CPU demo's" if tiny else
                   f"{family_name}: {d.micro_batch} at {d.reference_resolution} px on one 80 GB GPU "
                   + (f"({d.unmeasured})" if d.unmeasured else "(BENCHMARKS.md)")
                   + (f", scaled by pixels to {res} px" if res > d.reference_resolution else ""))
        if cfg.sample.batch_size == AUTO and (res or not hw.gpu):
            batch, why = sample_batch(cfg, hw, d, res)
            choose("sample", "batch_size", batch, why)
    if not update["train"] and not update["cache"] and not update["sample"] and "run" not in update:
        return cfg, chosen
    data = cfg.model_dump(mode="json")
    for section, values in update.items():
        if isinstance(values, dict):
            data[section] |= values
        else:
            data[section] = values
    return validate_layers([("auto", data)]), chosen


def states_gib(parameters_b: float, mode: str, precision: str, zero: int, ranks: int, offload_optimizer: bool,
               offload_params: bool) -> float:
    """GiB per GPU of the denoiser's weights, gradients and AdamW states (activations not counted):
    16 bytes a parameter in full fine-tuning (fp32 masters and two moments, 12, beside 2-byte bf16
    weights and gradients; bf16-mixed keeps 4-byte weights and gradients and no separate masters),
    each part divided over the ranks from the ZeRO stage that shards it. LoRA: the frozen weights."""
    p = parameters_b * 1e9 / 2**30
    weight_bytes = 4 if precision in ("fp32", "bf16-mixed") else 2
    if mode == "lora":
        return p * weight_bytes
    weights, grads = p * weight_bytes, p * weight_bytes
    optimizer = p * (8 if weight_bytes == 4 else 12)
    if offload_optimizer:
        optimizer = 0.0
    return (weights / (ranks if zero >= 3 else 1) * (0 if offload_params else 1)
            + grads / (ranks if zero >= 2 else 1) + optimizer / (ranks if zero >= 1 else 1))


def check_states_fit(cfg: Config, hw: Hardware, d: AutoDefaults, zero: int, precision: str) -> None:
    """A run whose weights, gradients and optimizer states alone exceed the card is refused at
    dry-run, naming what would fit, rather than running out of memory when the job starts."""
    t = cfg.train
    gib = card_gb(cfg, hw)
    need = states_gib(d.parameters_b, t.mode, precision, zero, hw.ranks, t.offload_optimizer == "cpu",
                      t.offload_params == "cpu")
    if need <= 0.9 * gib:
        return
    total = states_gib(d.parameters_b, t.mode, precision, 0, 1, False, False)
    ranks_z3 = math.ceil(total / (0.6 * gib))
    raise ConfigError(
        f"a {t.mode} fine-tune of this {d.parameters_b:g} B-parameter model holds about {total:.0f} GiB of weights, "
        f"gradients and AdamW states: {need:.0f} GiB on each of {hw.ranks} {gib:.0f} GB GPU(s) with ZeRO-{zero} "
        f"({precision}), more than the card. Options: ZeRO-3 on {ranks_z3} or more GPUs (train__zero_stage=3, e.g. "
        f"slurm__nodes), the optimizer on the CPU (train__offload_optimizer=cpu train__zero_stage=3), or LoRA "
        f"(train__mode=lora)")


def scaled_micro_batch(d: AutoDefaults, resolution: int) -> int:
    """The family's measured micro-batch at a larger resolution, scaled down with the pixels (activations
    grow with them); never above the measured one (a smaller resolution was not measured larger)."""
    scaled = d.micro_batch * min(1.0, (d.reference_resolution / resolution) ** 2)
    return max(1, int(scaled) // 4 * 4 if scaled >= 4 else int(scaled))


def card_gb(cfg: Config, hw: Hardware) -> float:
    """The memory (GiB, as cards are sold) the run's settings are for: the card recipe's, else the GPU's,
    else the defaults' 80."""
    if cfg.recipe.card_gb:
        return cfg.recipe.card_gb
    return hw.gpu_memory_gb or DEFAULT_CARD_GB


def sample_batch(cfg: Config, hw: Hardware, d: AutoDefaults, resolution: int | None) -> tuple[int, str]:
    if not hw.gpu:
        return CPU_SAMPLE_BATCH, "the CPU: two pipeline calls for the demo's 100 images"
    if d.sample_per_image_gib is None:
        return 1, "no measured sampling memory for this family: one image per call"
    gib = card_gb(cfg, hw)
    if cfg.train.memory_cap_gb:
        gib = min(gib, cfg.train.memory_cap_gb)
    per_image = d.sample_per_image_gib * (resolution / d.reference_resolution) ** 2
    batch = min(d.sample_max_batch, batch_that_fits(gib, d.sample_fixed_gib, per_image))
    return batch, (f"{gib:.0f} GiB: {d.sample_fixed_gib:g} GiB for the pipeline + {per_image:.3f} GiB per "
                   f"{resolution} px image (measured, bench/sample_memory.py), a tenth spare; at most "
                   f"{d.sample_max_batch}, the largest measured")


def batch_that_fits(gib: float, fixed_gib: float, per_image_gib: float) -> int:
    """Images per pipeline call that fit `gib` with a tenth left for the allocator's pieces (at least
    1, at most 64: beyond that a call is no faster)."""
    return max(1, min(64, int((0.9 * gib - fixed_gib) / per_image_gib)))


def steps_for(cfg: Config, samples: int, per_step: int) -> tuple[int, int, str]:
    """(steps, warm-up steps, why) for train.steps/warmup_steps auto: `samples` in the data set (held-out
    ones excluded), `per_step` of them in each optimizer step (the prior images' share excluded)."""
    t = cfg.train
    tiny = cfg.model.pretrained in TINY_BUILTINS
    if t.steps != AUTO:
        steps, why = t.steps, "train.steps"
    elif t.epochs != AUTO:
        steps, why = max(1, round(t.epochs * samples / per_step)), f"train.epochs {t.epochs:g} x {samples} samples"
    elif tiny:
        seen = defaults_for(cfg, None).demo_samples
        steps, why = max(1, round(seen / per_step)), f"the tiny builtins' {seen:,} samples"
    else:
        seen = min(100 * samples, 100_000)
        steps = max(1, round(seen / per_step))
        why = (f"100 epochs of {samples} samples" if seen < 100_000 else f"100,000 samples (fewer than 100 epochs "
               f"of {samples})")
    why += f" / {per_step} per step"
    if t.warmup_steps != AUTO:
        warmup = t.warmup_steps
    else:
        warmup = min(50, steps) if tiny else min(100, steps // 10)
    return steps, warmup, why


def check_card(cfg: Config, family: Family | None, resolution: int | None, hw: Hardware | None = None) -> None:
    """Before `auto` is resolved: a card recipe used for a model, resolution or card it was not measured
    for is refused, and so are the 80 GB defaults on a smaller GPU of this machine."""
    r = cfg.recipe
    small = hw is not None and hw.gpu and hw.gpu_memory_gb is not None
    if not r.name:
        if small and hw.gpu_memory_gb < 0.95 * DEFAULT_CARD_GB and cfg.train.micro_batch == AUTO \
                and cfg.model.pretrained not in TINY_BUILTINS:
            raise ConfigError(f"this machine's GPUs have {hw.gpu_memory_gb:.0f} GB; the automatic settings "
                              f"(train.micro_batch auto, ...) are for 80 GB cards: add the card recipe for yours "
                              f"(config/cards/, e.g. --configfile config/cards/24gb.yaml), or set train__micro_batch")
        return
    if family and r.families and family.name not in r.families:
        raise ConfigError(f"the card recipe {r.name} was measured for {' and '.join(r.families)} models, not for this "
                          f"{family.name} model (recipe.families): use a recipe for it (config/cards/)")
    if resolution and r.max_resolution and resolution > r.max_resolution:
        raise ConfigError(f"the card recipe {r.name} was measured at {r.max_resolution} px; this run caches at "
                          f"{resolution} px (cache.resolution): set cache__resolution={r.max_resolution} or use a "
                          f"recipe for the larger size")
    if small and r.card_gb and hw.gpu_memory_gb < 0.95 * r.card_gb:
        raise ConfigError(f"the card recipe {r.name} needs a {r.card_gb:g} GB card; this machine's GPUs have "
                          f"{hw.gpu_memory_gb:.0f} GB (config/cards/ has recipes for smaller cards)")


def resolve_here(cfg: Config, model_dir: Path | None) -> Config:
    """A stage's resolution of what is still `auto`: its own hardware, the model folder's family."""
    from .families import family_of, native_resolution

    family = resolution = None
    if model_dir is not None and (Path(model_dir) / "model_index.json").is_file():
        family = family_of(model_dir)
        resolution = native_resolution(model_dir)
    return resolve(cfg, Hardware.this_process(cfg), family, resolution)[0]


def family_named(name: str | None) -> Family | None:
    return FAMILIES.get(name) if name else None
