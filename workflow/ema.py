"""EMA of the trained weights, and stage `ema`: merge a training checkpoint into a diffusers model.

The merge consolidates the DeepSpeed checkpoint (any ZeRO stage 0-2, any world size) into full fp32
weights, and writes `<run>/model/`: a diffusers pipeline folder (safetensors) whose UNet holds the
EMA weights (`ema.use: true`) or the raw ones; the other set is kept beside it in
`model/unet_raw/` or `model/unet_ema/`.

    python -m workflow.ema --config config.yaml --model resources/models/tiny-digits \
        --run-dir results/runs/digits-tiny --out results/runs/digits-tiny/model
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from .cli import run, stage_main
from .config import Config
from .fsutil import atomic_dir, read_json, write_json


class EMA:
    """Exponential moving average of named parameters, kept in fp32, updated once per optimizer
    step. The decay warms up as min(decay, (1 + step) / (10 + step)) so early, random weights fade."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in named_params if p.requires_grad}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], step: int) -> None:
        d = self.decay_at(step)
        for name, p in named_params:
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameter(s), e.g. {sorted(missing)[:3]}")
        for n, t in self.shadow.items():
            t.copy_(state[n])


# ---------------------------------------------------------------- merge stage


def checkpoint_states_file(ckpt_dir: Path, tag: str) -> Path:
    path = ckpt_dir / tag / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} is incomplete: {path.name} missing")
    return path


def consolidate(ckpt_dir: Path, tag: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Full fp32 UNet weights + the client state (step, EMA) of one DeepSpeed checkpoint."""
    states = torch.load(checkpoint_states_file(ckpt_dir, tag), map_location="cpu", weights_only=False)
    zero_stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if zero_stage > 0:
        # The fp32 master weights live partitioned in the optimizer states of every rank.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        weights = states["module"]
    weights = {k: v.float().contiguous() for k, v in weights.items()}
    return weights, states


def merge(cfg: Config, model_dir: Path, run_dir: Path, out: Path) -> dict:
    from diffusers import StableDiffusionPipeline

    from .models import load_unet

    train_info = read_json(run_dir / "train.json", "training result")
    ckpt_dir, tag = run_dir / "checkpoints", train_info["checkpoint"]
    raw, states = consolidate(ckpt_dir, tag)
    ema_state = states.get("ema")
    if ema_state is None:
        raise ValueError(f"checkpoint {ckpt_dir / tag} holds no EMA weights")
    ema_weights = dict(raw) | {k: v.float() for k, v in ema_state.items()}

    unet = load_unet(model_dir)
    main, other, other_name = (ema_weights, raw, "unet_raw") if cfg.ema.use else (raw, ema_weights, "unet_ema")
    unet.load_state_dict(main, strict=True)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, unet=unet, safety_checker=None, requires_safety_checker=False)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        unet.load_state_dict(other, strict=True)
        unet.save_pretrained(tmp / other_name, safe_serialization=True)
        report = {"checkpoint": tag, "step": states.get("step"), "weights": "ema" if cfg.ema.use else "raw",
                  "other_weights": other_name, "ema_decay": cfg.ema.decay}
        write_json(tmp / "merge.json", report)
    print(f"ema: merged {ckpt_dir / tag} ({report['weights']} weights) -> {out}")
    return report


def main(argv: list[str] | None = None) -> None:
    args, cfg = stage_main("ema", __doc__, argv, {"model": "base model folder", "run_dir": "run folder", "out": "output model folder"})
    merge(cfg, Path(args.model), Path(args.run_dir), Path(args.out))


if __name__ == "__main__":
    run(main)
