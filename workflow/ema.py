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

import numpy as np
import torch

from .cli import run, stage_main
from .config import Config
from .fsutil import atomic_dir, read_json, write_json


class ShardedEMA:
    """EMA of this rank's share of the fp32 master weights, updated once per optimizer step.

    The share is where the optimizer keeps its fp32 master copy: the ZeRO 1/2 (and bf16) fragment
    or the ZeRO-3 partition of each trainable parameter, so EMA memory per rank is the fp32 model
    size / ranks, like the optimizer state. Without a master copy (ZeRO-0 in fp32, where the module
    weights are the master; ZeRO-0 fp16, where DeepSpeed keeps no per-parameter view of it) each
    rank takes an even slice of the module weights. A fragment is (parameter name, flat offset,
    values); the merge stage reassembles full tensors from every rank's fragments.

    The decay warms up as min(decay, (1 + step) / (10 + step)) when `warmup`, so early weights fade."""

    def __init__(self, engine, rank: int, world_size: int, decay: float, warmup: bool = True, offload: bool = False):
        self.decay, self.warmup, self.offload = decay, warmup, offload
        self.rank, self.world_size = rank, world_size
        self.attach(engine)
        self.shadow = [src.detach().float().clone().to("cpu" if offload else src.device) for src in self.sources]

    def attach(self, engine) -> None:
        """Find this rank's master fragments (again after a checkpoint load, which may replace them)."""
        self.names, self.offsets, self.sources = [], [], []
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            offset, values = master_fragment(p, self.rank, self.world_size)
            if values is not None and values.numel() > 0:
                self.names.append(name)
                self.offsets.append(offset)
                self.sources.append(values)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        if not self.shadow:
            return
        sources = [s.to(self.shadow[0].device, torch.float32, non_blocking=True) for s in self.sources]
        torch._foreach_lerp_(self.shadow, sources, 1.0 - self.decay_at(step))

    def state_dict(self) -> dict:
        return {"fragments": {n: (o, t.cpu()) for n, o, t in zip(self.names, self.offsets, self.shadow)},
                "decay": self.decay, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        frags = state["fragments"]
        mine = {n: o for n, o in zip(self.names, self.offsets)}
        if {n: o for n, (o, _) in frags.items()} != mine:
            raise ValueError("EMA shard in the checkpoint does not match this rank's parameters")
        for n, t in zip(self.names, self.shadow):
            t.copy_(frags[n][1])


def master_fragment(p: torch.nn.Parameter, rank: int, world_size: int) -> tuple[int, torch.Tensor | None]:
    """(flat offset, fp32 values) of this rank's share of parameter `p`, as a live view."""
    if hasattr(p, "ds_id"):  # ZeRO-3: the local fp32 partition; the parameter itself is empty here
        part, _ = p._z3_optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=True)
        offset = rank * p.ds_tensor.ds_numel
        return offset, part[: max(0, min(part.numel(), p.ds_numel - offset))]
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and DeepSpeed's bf16 optimizer
        frag = p._hp_mapping
        return (0, None) if frag is None else (frag.lp_fragment_address.start, frag.hp_fragment)
    flat = p.detach().view(-1)
    size = -(-flat.numel() // world_size)
    return rank * size, flat[rank * size : (rank + 1) * size]


def gather_fragments(states: list[dict]) -> dict[str, torch.Tensor]:
    """Flat fp32 tensors assembled from every rank's EMA fragments (checked to cover each exactly)."""
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for state in states:
        for name, (offset, values) in state["fragments"].items():
            parts.setdefault(name, []).append((offset, values))
    full = {}
    for name, frags in parts.items():
        frags.sort(key=lambda f: f[0])
        flat = torch.cat([v.float() for _, v in frags])
        covered = [o for o, _ in frags] == list(np.cumsum([0] + [v.numel() for _, v in frags[:-1]]))
        if not covered:
            raise ValueError(f"EMA fragments of {name} overlap or leave gaps")
        full[name] = flat
    return full


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


def load_ema(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Flat EMA tensors gathered from every rank's file of a checkpoint."""
    files = sorted((ckpt_dir / tag).glob("rank*.pt"))
    if not files:
        raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} holds no per-rank files with EMA weights")
    states = [torch.load(f, map_location="cpu", weights_only=False)["ema"] for f in files]
    if len(states) != states[0]["world_size"]:
        raise ValueError(f"checkpoint {ckpt_dir / tag} has {len(states)} rank files of {states[0]['world_size']}")
    return gather_fragments(states)


def merge(cfg: Config, model_dir: Path, run_dir: Path, out: Path) -> dict:
    from diffusers import StableDiffusionPipeline

    from .models import load_unet

    train_info = read_json(run_dir / "train.json", "training result")
    ckpt_dir, tag = run_dir / "checkpoints", train_info["checkpoint"]
    raw, states = consolidate(ckpt_dir, tag)
    ema_weights = dict(raw) | {k: v.view(raw[k].shape) for k, v in load_ema(ckpt_dir, tag).items()}

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
