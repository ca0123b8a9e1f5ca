"""The DeepSpeed engine of the train stage: its config, optimizer and learning-rate schedule.

The DeepSpeed config is generated here from `train.*` and nowhere else. `train.deepspeed` (raw
DeepSpeed keys, checked in config.py for what DeepSpeed would silently ignore) is merged last.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, TrainConfig, deep_merge
from .fast_step import lighten_zero0_step, remove_step_syncs, scale_zero0_fp16_loss

def deepspeed_config(cfg: Config, world_size: int, run_dir: Path) -> dict[str, Any]:
    """The DeepSpeed config for this run (the only place it is built)."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage in (1, 2):
        # Each gradient stays where backward wrote it, not copied into DeepSpeed's bucket parameter by
        # parameter: ZeRO-2 on one H200 ran 133 img/s with this against 124 (BENCHMARKS.md). CPU
        # offload turns it back on inside DeepSpeed, which needs it there.
        zero["contiguous_gradients"] = False
    if t.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available(),
                                     "ratio": t.offload_optimizer_ratio}
    if t.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    monitor = str(run_dir / "monitor")
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW as client optimizer (fused on GPU)
        "steps_per_print": 10**9,  # the train loop logs; DeepSpeed's own prints would interleave
        # DeepSpeed's throughput timer synchronizes the GPU at every forward and step, which stops
        # the host from queueing work ahead; the train loop measures throughput itself.
        "timers": {"throughput": {"enabled": False}},
        # bf16 cannot overflow the way fp16 does; DeepSpeed's per-gradient inf/NaN scan (several
        # kernels per parameter plus a host sync every step) is left to the train loop's
        # non-finite-loss check, which skips the micro-batch before backward.
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": False},
        # loss_scale 0 = dynamic loss scaling; overflowing steps are skipped by DeepSpeed and counted.
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # fp32 weights and optimizer, the forward under torch.autocast: DeepSpeed's engine sets the
        # autocast state itself (an autocast around engine(...) would be switched off inside it).
        "torch_autocast": {"enabled": t.precision == "bf16-mixed", "dtype": "bfloat16"},
        "csv_monitor": {"enabled": True, "output_path": monitor, "job_name": "train"},
        "tensorboard": {"enabled": True, "output_path": monitor, "job_name": "train"},
    }
    if t.wandb.enabled:
        ds["wandb"] = {"enabled": True, "project": t.wandb.project, "group": t.wandb.group, "team": t.wandb.team}
    return deep_merge(ds, t.deepspeed)


def check_zero_section(ds: dict[str, Any]) -> None:
    """DeepSpeed's own validation of the ZeRO section, run before any rank starts."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**ds["zero_optimization"])
    except ValidationError as e:
        lines = [f"  train.deepspeed.zero_optimization.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid train.deepspeed:\n" + "\n".join(lines)) from None


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """AdamW: DeepSpeed's CPU Adam when the optimizer is offloaded, torch's fused kernel on a GPU."""
    t = cfg.train
    if t.offload_optimizer == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=t.lr, weight_decay=t.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=device.type == "cuda")


def lr_factor(t: TrainConfig, step: int) -> float:
    """Multiplier of train.lr for optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    if t.lr_schedule == "linear":
        return 1.0 - progress
    if t.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.lr_schedule {t.lr_schedule!r} reached the optimizer unresolved (workflow/auto.py resolves auto)")


def make_lr_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg.train, step))


def build_engine(cfg: Config, unet: torch.nn.Module, world_size: int, run_dir: Path, device: torch.device,
                 shapes: int = 1, load_universal: bool = False):
    """(engine, lr scheduler) for the trainable parameters of `unet`; `shapes`: latent shapes it meets;
    `load_universal`: it will load a universal checkpoint (one written by another number of ranks)."""
    import deepspeed

    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, device)
    lr_sched = make_lr_scheduler(cfg, optimizer)
    engine, _, _, _ = deepspeed.initialize(model=unet, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=lr_sched, config=deepspeed_config(cfg, world_size, run_dir)
                                           | ({"checkpoint": {"load_universal": True}} if load_universal else {}))
    remove_step_syncs(engine.optimizer)
    lighten_zero0_step(engine, world_size)
    scale_zero0_fp16_loss(engine)
    if cfg.train.compile:
        use_compile_cache(cfg.train.compile_cache)
        compile_forward(unet, cfg.train.compile_shapes, shapes, cfg.train.activation_memory_budget,
                        compiled_blocks(unet, cfg.train.compile_scope))
    return engine, lr_sched


def compiled_blocks(model: torch.nn.Module, scope: str) -> list[str] | None:
    """The submodules train.compile_scope compiles one by one (None: the whole forward): every module
    of a class the model declares repeated (diffusers' `_repeated_blocks`, what its
    compile_repeated_blocks compiles: the UNet's BasicTransformerBlock, FLUX's two block classes),
    and the family's own additions (the UNet's ResnetBlock2D); the outermost where they nest."""
    if scope == "model":
        return None
    from .families import family_of_denoiser

    classes = set(getattr(type(model), "_repeated_blocks", None) or ()) | set(family_of_denoiser(model).compiled_regions)
    names: list[str] = []
    for name, module in model.named_modules():
        if type(module).__name__ in classes and not any(name.startswith(outer + ".") for outer in names):
            names.append(name)
    if not names:
        raise ValueError(f"train.compile_scope: blocks: a {type(model).__name__} has no module of the classes "
                         f"{sorted(classes)} to compile; set train.compile_scope: model")
    return names


def use_compile_cache(folder: str | None) -> None:
    """Inductor's on-disk caches (FX graphs, AOTAutograd, Triton kernels) in `folder`, before the first
    compile reads the location."""
    if folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(folder).resolve())


def compile_forward(module: torch.nn.Module, mode: str = "auto", shapes: int = 1,
                    activation_memory_budget: float | None = None, blocks: list[str] | None = None) -> None:
    """torch.compile `module.forward` in place; state-dict names stay the same. Only forward: compiling
    the whole call (nn.Module.compile, DeepSpeed's engine.compile) also traces DeepSpeed's forward
    hooks, where Dynamo breaks the graph five times (a ZeroStageEnum comparison it cannot trace).

    `shapes` = the latent shapes training meets (one per bucket). per_bucket compiles one static graph
    per shape, for training and for the validation loss (no_grad is another graph): Dynamo's recompile
    limit (8) would otherwise stop compiling past 8 graphs and run the rest eagerly, silently slow.

    `activation_memory_budget` (train.activation_memory_budget) is torch's process-wide setting, read
    when the first call partitions the graph into forward and backward.

    `blocks` (train.compile_scope: blocks): compile the forward of each of these submodules instead of
    the whole. Dynamo keys its cache on the code object and, with nn-module inlining (torch >= 2.5's
    default), guards on the parameters' shapes rather than the module's identity, so the blocks of one
    class share one graph per shape: the recompile limits count graphs per block class."""
    if activation_memory_budget is not None:
        import torch._functorch.config as functorch

        functorch.activation_memory_budget = activation_memory_budget
    if mode == "per_bucket":
        import torch._dynamo.config as dynamo

        # per shape, a graph with gradients and one without (the validation loss); compiled blocks: twice
        # that, as the first block of a run of siblings can see its input with other strides (FLUX's
        # first single-stream block gets a view of the double-stream output)
        per_shape = 4 if blocks else 2
        dynamo.recompile_limit = max(dynamo.recompile_limit, per_shape * shapes + 2)
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 2 * per_shape * shapes + 8)
    dynamic = {"auto": None, "dynamic": True, "per_bucket": False}[mode]
    for target in [module.get_submodule(name) for name in blocks] if blocks else [module]:
        target.forward = torch.compile(target.forward, dynamic=dynamic)
