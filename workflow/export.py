"""Stage `export`: the merged model as files that AUTOMATIC1111/Forge, ComfyUI, InvokeAI and SD.Next load.

Writes `results/runs/<run>/export/` with the formats in `export.formats` that apply to the run:
- `checkpoint`: `<run>.safetensors`, the whole pipeline (UNet, VAE, text encoder(s)) in the original
  single-file layout of its family (key tables: original_layout.py), in `export.dtype`; for a
  v-prediction SD 1.x/2.x model also `<run>.yaml`, the original config A1111 reads beside it. Full
  runs, and LoRA runs merged with `ema.fuse_lora: true`.
- `kohya_lora`: `<run>_lora.safetensors`, the LoRA in kohya's layout (`lora_unet_...lora_down/
  lora_up/alpha`), converted with diffusers' `convert_state_dict_to_kohya`, each module's `alpha` the
  trained `train.lora.alpha` (that converter writes alpha = rank, which would load a LoRA trained
  with alpha != rank at the wrong strength). LoRA runs.
Each file carries Stability's ModelSpec keys (`modelspec.*`) and kohya's training keys (`ss_*`) that
those tools display: no absolute paths. `export.json` lists what was written.

    python -m workflow.export --config config.yaml --model results/runs/digits-tiny/model \
        --base-model resources/models/tiny-digits --run-dir results/runs/digits-tiny \
        --data results/data/digits --out results/runs/digits-tiny/export
"""

from __future__ import annotations

import datetime
import hashlib
import json
import struct
from pathlib import Path

import torch

from .cli import run, stage_main
from .config import Config
from .families import UNET_PREFIX, VAE_PREFIX, Family, family_of
from .fsutil import atomic_dir, read_json, write_json
from .original_layout import clip_to_original, convert, openclip_to_original, unet_rows, vae_rows

EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def checkpoint_state_dict(model_dir: Path, family: Family, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The pipeline folder's weights under the original single-file keys."""
    from .models import load_denoiser, load_text_encoder, load_vae

    unet, vae = load_denoiser(model_dir), load_vae(model_dir)
    out = convert(unet.state_dict(), unet_rows(dict(unet.config)), UNET_PREFIX, "unet")
    out |= convert(vae.state_dict(), vae_rows(dict(vae.config)), VAE_PREFIX, "vae")
    for layout in family.text_encoders:
        weights = load_text_encoder(model_dir, folder=layout.folder).state_dict()
        out |= (openclip_to_original if layout.openclip else clip_to_original)(weights, layout.prefix)
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}


def original_config_yaml(model_dir: Path, family: Family, prediction_type: str) -> str:
    """The ldm config (v1/v2-inference*.yaml style) of this folder's architecture, which A1111 reads
    from `<file>.yaml` beside a checkpoint: without it a v-prediction model is run as epsilon."""
    import yaml

    unet = read_json(model_dir / "unet" / "config.json", "unet config")
    vae = read_json(model_dir / "vae" / "config.json", "vae config")
    sched = read_json(model_dir / "scheduler" / "scheduler_config.json", "scheduler config")
    channels = unet["block_out_channels"]
    heads = unet["attention_head_dim"]
    heads = heads if isinstance(heads, list) else [heads] * len(channels)
    attention = [2**i for i, t in enumerate(unet["down_block_types"]) if "CrossAttn" in t]
    unet_params = {"image_size": unet["sample_size"], "in_channels": unet["in_channels"],
                   "out_channels": unet["out_channels"], "model_channels": channels[0],
                   "attention_resolutions": attention, "num_res_blocks": unet["layers_per_block"],
                   "channel_mult": [c // channels[0] for c in channels], "use_spatial_transformer": True,
                   "transformer_depth": 1, "context_dim": unet["cross_attention_dim"], "legacy": False,
                   "use_checkpoint": False}
    if family.name == "sd2":  # heads given by their width (64), and linear projections in/out of attention
        unet_params |= {"num_head_channels": channels[0] // heads[0], "use_linear_in_transformer": True}
    else:
        unet_params["num_heads"] = heads[0]
    vae_channels = vae["block_out_channels"]
    ddconfig = {"double_z": True, "z_channels": vae["latent_channels"], "resolution": vae["sample_size"],
                "in_channels": vae["in_channels"], "out_ch": vae["out_channels"], "ch": vae_channels[0],
                "ch_mult": [c // vae_channels[0] for c in vae_channels], "num_res_blocks": vae["layers_per_block"],
                "attn_resolutions": [], "dropout": 0.0}
    cond = ({"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": {"freeze": True, "layer": "penultimate"}}
            if family.name == "sd2" else {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"})
    params = {"linear_start": sched.get("beta_start", 0.00085), "linear_end": sched.get("beta_end", 0.012),
              "num_timesteps_cond": 1, "timesteps": sched.get("num_train_timesteps", 1000), "first_stage_key": "jpg",
              "cond_stage_key": "txt", "image_size": unet["sample_size"], "channels": unet["in_channels"],
              "cond_stage_trainable": False, "conditioning_key": "crossattn", "scale_factor": vae["scaling_factor"],
              "use_ema": False,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
              "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                     "params": {"embed_dim": vae["latent_channels"], "ddconfig": ddconfig,
                                                "lossconfig": {"target": "torch.nn.Identity"}}},
              "cond_stage_config": cond}
    if prediction_type == "v_prediction":
        params = {"parameterization": "v", **params}
    return yaml.safe_dump({"model": {"target": family.ldm_target, "params": params}}, sort_keys=False)


def read_lora_file(lora_file: Path, denoiser: str) -> tuple[dict, float, int]:
    """(the denoiser's LoRA weights, under their `<denoiser>.` keys; alpha; rank) of a diffusers-format
    LoRA file as the merge writes it."""
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    if meta.get(f"{denoiser}.alpha_pattern") or meta.get(f"{denoiser}.rank_pattern"):
        raise ValueError(f"{lora_file}: per-module alpha/rank patterns cannot be written as one kohya alpha")
    own = {k: v for k, v in weights.items() if k.startswith(f"{denoiser}.")}
    if len(own) != len(weights):
        raise ValueError(f"{lora_file}: only {denoiser} LoRA can be exported (found {sorted(set(weights) - set(own))[:3]})")
    return own, float(meta[f"{denoiser}.lora_alpha"]), int(meta[f"{denoiser}.r"])


def kohya_lora_state_dict(lora_file: Path, family: Family, unet_config: dict) -> tuple[dict, float, int]:
    """(kohya state dict, alpha, rank) from the merge's diffusers-format LoRA file of a UNet."""
    from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    weights, alpha, rank = read_lora_file(lora_file, "unet")
    unet = {k.removeprefix("unet."): v for k, v in weights.items()}
    peft = convert_unet_state_dict_to_peft(unet)
    if family.kohya_unet_names == "original":  # SDXL LoRA names follow the sgm UNet's modules
        peft = convert(peft, unet_rows(unet_config), "", "lora")
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft.items()})
    for key in kohya:
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(alpha)
    return kohya, alpha, rank


def metadata(cfg: Config, family: Family, info: dict, dataset_count: int, prediction_type: str, lora: tuple | None) -> dict:
    """ModelSpec keys (Stability's metadata standard) and kohya's `ss_*` training keys, all strings; the
    training's own settings from train.json (what `auto` resolved to there)."""
    t = cfg.train.model_copy(update={k: info[k] for k in ("lr", "warmup_steps", "precision", "zero_stage") if k in info})
    v = prediction_type == "v_prediction"
    architecture = family.modelspec + family.modelspec_suffixes.get(prediction_type, "")
    res = cfg.cache.resolution
    meta = {"modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": architecture + ("/lora" if lora else ""),
            "modelspec.implementation": "diffusers" if lora and family.kohya_unet_names == "diffusers"
            else family.implementation,
            "modelspec.title": cfg.export.title or (f"{cfg.run} LoRA" if lora else cfg.run),
            "modelspec.description": f"{'LoRA' if lora else 'Fine-tune'} of {cfg.model_name} on {cfg.dataset_name} "
                                     f"({dataset_count} images), {info['final_step']} steps, deepspeed-diffusers",
            "modelspec.resolution": f"{res}x{res}",
            "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "ss_base_model_version": family.lora_version, "ss_sd_model_name": cfg.model_name,
            "ss_v2": str(family.lora_version == "sd_v2"), "ss_v_parameterization": str(v),
            "ss_max_train_steps": str(info["final_step"]), "ss_learning_rate": str(info.get("lr", t.lr)),
            "ss_lr_scheduler": info.get("lr_schedule", t.lr_schedule), "ss_lr_warmup_steps": str(info.get("warmup_steps", t.warmup_steps)),
            "ss_total_batch_size": str(info["global_batch"]), "ss_mixed_precision": t.precision,
            "ss_seed": str(t.seed), "ss_resolution": f"({res}, {res})", "ss_num_train_images": str(dataset_count),
            "ss_dataset_name": cfg.dataset_name, "ss_training_comment": f"run {cfg.run}, ZeRO-{t.zero_stage}, "
                                                                        f"{info['world_size']} ranks"}
    if prediction_type in ("epsilon", "v_prediction"):  # ModelSpec names no flow-matching type: left out, as kohya does
        meta["modelspec.prediction_type"] = "v" if v else "epsilon"
    if lora:
        alpha, rank = lora
        meta |= {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}"}
    return meta


def save_with_hash(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> str:
    """safetensors file whose `modelspec.hash_sha256` is the sha256 of its tensor bytes (the header
    excluded, as ModelSpec defines it). Serialized once: the hash goes into the header, whose
    offsets count from the end of the header, so the tensor bytes stay as they are. Returns the hash."""
    from safetensors.torch import save

    blob = save(tensors, metadata=meta)
    header_len = struct.unpack("<Q", blob[:8])[0]
    data = memoryview(blob)[8 + header_len:]
    digest = "0x" + hashlib.sha256(data).hexdigest()
    header = json.loads(blob[8:8 + header_len])
    header["__metadata__"]["modelspec.hash_sha256"] = digest
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors keeps the tensor bytes 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        f.write(data)
    return digest


def export(cfg: Config, model_dir: Path, base_dir: Path, run_dir: Path, data_dir: Path, out: Path) -> dict:
    cfg = cfg.at_model_resolution(base_dir)
    merge = read_json(model_dir / "merge.json", "merge report")
    info = read_json(run_dir / "train.json", "training result")
    count = read_json(data_dir / "manifest.json", "data manifest")["count"]
    family = family_of(base_dir)
    prediction_type = merge["prediction_type"]
    dtype = EXPORT_DTYPES[cfg.export.dtype]
    report = {"family": family.name, "dtype": cfg.export.dtype, "files": {}, "skipped": {}}
    with atomic_dir(out) as tmp:
        if "checkpoint" in cfg.export.formats:
            if (model_dir / "model_index.json").is_file():  # a full model (not a LoRA-only merge)
                name = f"{cfg.run}.safetensors"
                tensors = family.checkpoint_state_dict(model_dir, dtype)
                meta = metadata(cfg, family, info, count, prediction_type, None)
                digest = save_with_hash(tensors, meta, tmp / name)
                report["files"][name] = {"format": "checkpoint", "tensors": len(tensors), "hash_sha256": digest,
                                         "architecture": meta["modelspec.architecture"]}
                if prediction_type == "v_prediction" and family.ldm_target.startswith("ldm."):  # A1111 reads its yaml
                    (tmp / f"{cfg.run}.yaml").write_text(original_config_yaml(model_dir, family, prediction_type))
                    report["files"][f"{cfg.run}.yaml"] = {"format": "original config (v-prediction)"}
            else:
                report["skipped"]["checkpoint"] = "a LoRA merge without ema.fuse_lora has no full model to export"
        if "kohya_lora" in cfg.export.formats:
            if merge["mode"] == "lora":
                name = f"{cfg.run.removesuffix('-lora')}_lora.safetensors"  # run auto ends in -lora already
                tensors, alpha, rank = family.kohya_lora_state_dict(model_dir / merge["lora_file"], base_dir)
                meta = metadata(cfg, family, info, count, prediction_type, (alpha, rank))
                tensors = {k: (v if k.endswith(".alpha") else v.to(dtype)).contiguous() for k, v in tensors.items()}
                digest = save_with_hash(tensors, meta, tmp / name)
                report["files"][name] = {"format": "kohya_lora", "tensors": len(tensors), "alpha": alpha, "rank": rank,
                                         "hash_sha256": digest, "architecture": meta["modelspec.architecture"]}
            else:
                report["skipped"]["kohya_lora"] = "a full fine-tune has no LoRA"
        write_json(tmp / "export.json", report)
    print(f"export: {', '.join(report['files']) or 'nothing'} -> {out}")
    return report


def main(argv: list[str] | None = None) -> None:
    args, cfg = stage_main("export", __doc__, argv, {"model": "merged model folder (the ema stage's output)",
                                                       "base_model": "base model folder", "run_dir": "run folder",
                                                       "data": "prepared data folder", "out": "output folder"})
    export(cfg, Path(args.model), Path(args.base_model), Path(args.run_dir), Path(args.data), Path(args.out))


if __name__ == "__main__":
    run(main)
