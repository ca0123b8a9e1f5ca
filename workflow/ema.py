"""Stage `ema`: merge a training checkpoint into a diffusers model.

The merge consolidates the last DeepSpeed checkpoint (any ZeRO stage 0-3, any number of ranks) into
full fp32 weights, gathers the EMA shards (or reconstructs a post-hoc EMA, see posthoc.py), checks both
against checksums the engine computed at the end of training, and writes `<run>/model/`:
- full mode: a diffusers pipeline folder (safetensors) whose denoiser (UNet, FLUX's transformer) holds the EMA weights
  (`ema.use: true`) or the raw ones; the other set beside it in `<denoiser>_raw/` or `_ema/`;
- lora mode: `pytorch_lora_weights.safetensors` (diffusers format, `pipe.load_lora_weights`), the
  other set in `lora_raw/` or `lora_ema/`, and with `ema.fuse_lora` the full pipeline, adapters fused.

    python -m workflow.ema --config config.yaml --model resources/models/tiny-digits \
        --run-dir results/runs/digits-tiny --out results/runs/digits-tiny/model
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .cli import run, stage_main
from .config import Config
from .sharded_ema import checksum, gather_fragments, load_ema, load_rank_files, split_flat
from .families import family_of
from .fsutil import atomic_dir, read_json, write_json
from .posthoc import sigma_rel_to_gamma, solve_coefficients

def model_states_file(ckpt_dir: Path, tag: str) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):  # ZeRO 0-2, ZeRO-3
        if (ckpt_dir / tag / name).is_file():
            return ckpt_dir / tag / name
    raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} is incomplete: no DeepSpeed model states file")


def consolidate(ckpt_dir: Path, tag: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Full fp32 weights of the trained parameters (all of the UNet, or the LoRA adapters) and the
    client state of one DeepSpeed checkpoint, whatever the ZeRO stage and number of ranks."""
    states = torch.load(model_states_file(ckpt_dir, tag), map_location="cpu", weights_only=False)
    zero_stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if zero_stage > 0:
        # The fp32 master weights live partitioned in the optimizer states of every rank.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, exclude_frozen_parameters=True)
    else:
        weights = zero0_master_weights(states)
    return {k: v.float().contiguous() for k, v in weights.items()}, states


def zero0_master_weights(states: dict) -> dict[str, torch.Tensor]:
    """ZeRO-0: the module weights, or in bf16/fp16 the optimizer's fp32 masters of them (saved in
    optimizer order, which is the order of the trained parameters in the module)."""
    module, optim = states["module"], states.get("optimizer") or {}
    names = [n for n in module if n not in set(states.get("buffer_names") or [])]
    if "fp32_groups" in optim:
        masters = [m for group in optim["fp32_groups"] for m in group]
    elif "fp32_groups_flat" in optim:
        masters = split_flat(torch.cat([f.view(-1) for f in optim["fp32_groups_flat"]]), [module[n].numel() for n in names])
    else:
        return module
    if len(masters) != len(names):
        raise ValueError(f"checkpoint has {len(masters)} fp32 master tensors for {len(names)} parameters")
    return dict(module) | {n: m.view(module[n].shape) for n, m in zip(names, masters)}


def reconstruct_posthoc(posthoc_dir: Path, target_step: int, target_sigma_rel: float) -> tuple[dict, dict]:
    """The EMA of profile `target_sigma_rel` at `target_step`, as a least-squares combination of every
    snapshot up to that step (Karras et al. 2024); returns flat tensors and a report of the fit."""
    snaps = sorted(d for d in posthoc_dir.glob("step*") if int(d.name[4:]) <= target_step) if posthoc_dir.is_dir() else []
    if not snaps:
        raise FileNotFoundError(f"no post-hoc EMA snapshots in {posthoc_dir} (ema.posthoc.sigma_rels set in training?)")
    columns = [(d, sigma) for d in snaps for sigma in load_rank_files(d, "snapshot")[0]["profiles"]]
    steps = [int(d.name[4:]) for d, _ in columns]
    gammas = [sigma_rel_to_gamma(sigma) for _, sigma in columns]
    coeffs, error = solve_coefficients(steps, gammas, target_step, sigma_rel_to_gamma(target_sigma_rel))
    total: dict[str, torch.Tensor] = {}
    for d in snaps:  # one snapshot folder in memory at a time
        states = load_rank_files(d, "snapshot")
        for sigma in states[0]["profiles"]:
            c = float(coeffs[columns.index((d, sigma))])
            for name, flat in gather_fragments([s["profiles"][sigma] for s in states]).items():
                total[name] = total[name] + c * flat.double() if name in total else c * flat.double()
    report = {"target_sigma_rel": target_sigma_rel, "target_step": target_step, "snapshots": len(snaps),
              "profiles": sorted({sigma for _, sigma in columns}), "relative_profile_error": error,
              "coefficients": {f"{d.name}@{sigma}": float(c) for (d, sigma), c in zip(columns, coeffs)}}
    return {k: v.float() for k, v in total.items()}, report


def verify_against_engine(weights: dict[str, torch.Tensor], digest: dict[str, list[float]], what: str) -> None:
    """Refuse to write a model whose consolidated weights differ from what the engine held."""
    if set(weights) != set(digest):
        raise ValueError(f"{what}: consolidated parameters differ from training's: "
                         f"{sorted(set(weights) ^ set(digest))[:5]}")
    for name, expected in digest.items():
        got = checksum(weights[name]).tolist()
        scale = abs(expected[0]) + expected[1] ** 0.5 * weights[name].numel() ** 0.5 + 1e-12
        if any(abs(g - e) > 1e-7 * (abs(e) + scale) for g, e in zip(got, expected)):
            raise ValueError(f"{what}: {name} differs from the weights the engine held (checksums {got} vs {expected})")


def merge(cfg: Config, model_dir: Path, run_dir: Path, out: Path) -> dict:
    info = read_json(run_dir / "train.json", "training result")
    ckpt_dir, tag = run_dir / "checkpoints", info["checkpoint"]
    raw, states = consolidate(ckpt_dir, tag)
    verify_against_engine(raw, info["digest"]["raw"], "raw weights")
    ema = load_ema(ckpt_dir, tag)
    verify_against_engine(ema, info["digest"]["ema"], "EMA weights")
    report = {"checkpoint": tag, "step": info["final_step"], "mode": cfg.train.mode,
              "weights": "ema" if cfg.ema.use else "raw", "ema_decay": cfg.ema.decay,
              "prediction_type": info["prediction_type"], "verified_against_engine": True}
    if cfg.ema.target_sigma_rel is not None:
        ema, report["posthoc"] = reconstruct_posthoc(run_dir / "posthoc", info["final_step"], cfg.ema.target_sigma_rel)
        report["weights"] = "posthoc-ema" if cfg.ema.use else "raw"
    ema = {k: v.view(raw[k].shape) for k, v in ema.items()}
    main, other = (ema, raw) if cfg.ema.use else (raw, ema)
    with atomic_dir(out) as tmp:
        if cfg.train.mode == "lora":
            report |= export_lora(cfg, model_dir, main, other, tmp, info["prediction_type"])
        else:
            other_name = family_of(model_dir).denoiser + ("_raw" if cfg.ema.use else "_ema")  # unet_raw for a UNet
            report |= export_full(model_dir, main, other, tmp, other_name,
                                  info["prediction_type"])
        write_json(tmp / "merge.json", report)
    print(f"ema: merged {ckpt_dir / tag} ({report['weights']} weights, {cfg.train.mode}) -> {out}")
    return report


def checkpoint_denoiser(cfg: Config, model_dir: Path, ckpt_dir: Path, tag: str):
    """The denoiser (UNet, transformer) of one training checkpoint (its EMA weights when ema.use),
    LoRA adapters fused in."""
    from .models import add_lora, load_denoiser

    raw, _ = consolidate(ckpt_dir, tag)
    weights = {k: v.view(raw[k].shape) for k, v in load_ema(ckpt_dir, tag).items()} if cfg.ema.use else raw
    denoiser = load_denoiser(model_dir)
    if cfg.train.mode == "lora":
        load_adapters(add_lora(denoiser, cfg.train.lora), weights)
        denoiser.fuse_lora()
        denoiser.unload_lora()
    else:
        denoiser.load_state_dict(weights, strict=True)
    return denoiser


def load_adapters(unet, weights: dict) -> None:
    """Trained LoRA weights into `unet`'s adapters (the frozen base weights are not in them); every
    adapter weight must be there, so a checkpoint of other adapters is refused, not half-loaded."""
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if unexpected or any("lora_" in k for k in missing):
        raise ValueError(f"LoRA weights do not fit the adapters: {(unexpected or missing)[:3]}")


def save_pipeline(model_dir: Path, denoiser, folder: Path, prediction_type: str) -> None:
    """The base pipeline with the trained `denoiser`, its scheduler predicting what it was trained to;
    the rest (safety checker, feature extractor, scheduler settings) as the base has it."""
    from .models import load_pipeline

    pipe = load_pipeline(model_dir, **{family_of(model_dir).denoiser: denoiser})
    if "prediction_type" in pipe.scheduler.config:  # a DDPM schedule (a flow-matching one has none)
        pipe.scheduler.register_to_config(prediction_type=prediction_type)
    pipe.save_pretrained(folder, safe_serialization=True)
    keep_settings_components(model_dir, folder)


def keep_settings_components(base: Path, folder: Path) -> None:
    """Components without weights (feature extractor, tokenizer) as the base has them: a re-save can
    change them (transformers names its image processor's class after the backend it found)."""
    from .models import is_weights, pipeline_components

    index_path = folder / "model_index.json"
    index, base_index = read_json(index_path, "model index"), read_json(base / "model_index.json", "model index")
    for name in pipeline_components(base):
        has_weights = any(is_weights(f.name) for f in (base / name).iterdir())
        if name == "scheduler" or has_weights:
            continue
        shutil.rmtree(folder / name, ignore_errors=True)
        shutil.copytree(base / name, folder / name)
        index[name] = base_index[name]
    write_json(index_path, index)


def export_full(model_dir: Path, main: dict, other: dict, tmp: Path, other_name: str, prediction_type: str) -> dict:
    from .models import load_denoiser

    unet = load_denoiser(model_dir)
    unet.load_state_dict(other, strict=True)
    unet.save_pretrained(tmp / other_name, safe_serialization=True)
    unet.load_state_dict(main, strict=True)
    save_pipeline(model_dir, unet, tmp, prediction_type)
    return {"other_weights": other_name}


def export_lora(cfg: Config, model_dir: Path, main: dict, other: dict, tmp: Path, prediction_type: str) -> dict:
    """pytorch_lora_weights.safetensors (diffusers format, for pipe.load_lora_weights) of the chosen
    weights, the other set in lora_raw/ or lora_ema/, and with ema.fuse_lora the fused full model."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from .models import add_lora, load_denoiser, pipeline_class

    unet = add_lora(load_denoiser(model_dir), cfg.train.lora)
    metadata = unet.peft_config["default"].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # a set: not JSON
    # Adapter dropout is a training setting. diffusers' load_lora_weights builds the adapters from
    # this metadata with dropout layers in training mode inside an eval-mode UNet, so a file that
    # carried train.lora.dropout would generate with random adapter dropout.
    metadata["lora_dropout"] = 0.0

    def save_adapter(weights: dict, folder: Path) -> None:
        load_adapters(unet, weights)
        family = family_of(model_dir)
        layers = get_peft_model_state_dict(unet)
        if family.lora_keys == "diffusers":  # lora.down/lora.up, as diffusers' SD LoRA scripts save
            layers = convert_state_dict_to_diffusers(layers)
        kwarg = family.lora_layers_kwarg  # unet_lora_layers: the keyword names the denoiser
        pipeline_class(model_dir).save_lora_weights(folder, safe_serialization=True, **{
            kwarg: layers, kwarg.replace("_layers", "_adapter_metadata"): metadata})

    other_name = "lora_raw" if cfg.ema.use else "lora_ema"
    save_adapter(other, tmp / other_name)
    save_adapter(main, tmp)
    if cfg.ema.fuse_lora:
        unet.fuse_lora()
        unet.unload_lora()
        save_pipeline(model_dir, unet, tmp, prediction_type)
    return {"other_weights": other_name, "lora_file": "pytorch_lora_weights.safetensors", "fused": cfg.ema.fuse_lora,
            "base_model": str(model_dir)}


def main(argv: list[str] | None = None) -> None:
    args, cfg = stage_main("ema", __doc__, argv, {"model": "base model folder", "run_dir": "run folder", "out": "output model folder"})
    merge(cfg, Path(args.model), Path(args.run_dir), Path(args.out))


if __name__ == "__main__":
    run(main)
