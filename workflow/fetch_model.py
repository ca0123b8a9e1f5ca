"""Stage `fetch_model`: `model.pretrained` -> a diffusers pipeline folder under resources/models/.

  builtin:tiny       built here: CLIP tokenizer learned on the captions, small CLIP text encoder,
                     AutoencoderKL fitted briefly on the prepared images, random UNet, DDPM scheduler
  builtin:tiny-sd2   the same, SD 2.x-shaped (OpenCLIP-like gelu text encoder, linear attention projections)
  builtin:tiny-xl    the same, SDXL-shaped: two text encoders (the second's pooled projection and the
                     size `time_ids` are the UNet's added conditions, `addition_embed_type: text_time`)
  builtin:sd15-arch  Stable Diffusion 1.5's architecture with random weights (for benchmarks)
  builtin:sdxl-arch  SDXL 1.0 base's architecture with random weights (for benchmarks)
  builtin:tiny-flux  FLUX.1-shaped and small: CLIP (pooled) and T5 encoders, 16-channel VAE fitted on the
                     images, a transformer of 2 double- and 2 single-stream blocks (workflow/flux.py)
  builtin:flux-arch  FLUX.1-dev's architecture with random weights (for benchmarks; 24 GB on disk)
  <local folder>     a diffusers folder, used as is (linked, not copied)
  <file>.safetensors / .ckpt  a single-file checkpoint in the original layout, converted with diffusers'
                     from_single_file, offline (workflow/single_file.py)
  <org/name>         a Hugging Face Hub id, downloaded with huggingface_hub (needs internet)

    python -m workflow.fetch_model --config config.yaml --data results/data/digits --out resources/models/tiny-digits
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .cli import run, stage_main
from .config import TINY_BUILTINS, Config
from .fsutil import atomic_dir, read_json, write_json
from .imaging import resize_crop, decode_image, to_tensor
from .families import ARCH_BUILTINS, BUILTIN_RESOLUTIONS, FAMILIES
from .inputs import model_source
from .models import (check_model_dir, file_variant, is_weights, listed_components,
                     pipeline_components, preferred_variant)
from .shards import iter_shard



def load_prepared(data_dir: Path, resolution: int):
    """All prepared images (resized) and their first captions; fine for data sets that fit in RAM."""
    manifest = read_json(data_dir / "manifest.json", "data manifest")
    images, captions = [], []
    for shard in manifest["shards"]:
        for sample in iter_shard(data_dir / shard["name"]):
            images.append(resize_crop(decode_image(sample), resolution))
            captions.extend(json.loads(sample["json"])["captions"][:1])
    return to_tensor(images), captions


def link_local(src: Path, tmp: Path) -> None:
    """A folder of links to the user's model: nothing copied, and Snakemake deleting our output
    before a rerun only removes the links. model_index.json and the components it lists (the
    safety checker and feature extractor too, so a merged model keeps them), not the rest of a
    repo (single-file checkpoints beside it)."""
    for name in ["model_index.json", *pipeline_components(src)]:
        (tmp / name).symlink_to((src / name).resolve())


def replace_vae(model_dir: Path, vae_dir: Path) -> str:
    """model.vae: the model folder's vae/ becomes a link to the user's VAE folder, so every stage
    (cache, merge, sample, export) uses it; its latent scaling must be the model's (an fp16-fix
    VAE is a drop-in for SDXL's; SD 1.x's VAE is not one for SDXL)."""
    from diffusers import AutoencoderKL

    if not (vae_dir / "config.json").is_file():
        raise FileNotFoundError(f"model.vae: {vae_dir} is not a diffusers VAE folder (no config.json)")
    own, new = read_json(model_dir / "vae" / "config.json"), read_json(vae_dir / "config.json")
    if new.get("_class_name") != AutoencoderKL.__name__:
        raise ValueError(f"model.vae: {vae_dir} holds a {new.get('_class_name')}, not an AutoencoderKL")
    for key in ("latent_channels", "scaling_factor"):
        if own.get(key) != new.get(key):
            raise ValueError(f"model.vae: {vae_dir} has {key} {new.get(key)}, the model's VAE {own.get(key)}: "
                             f"latents would not be in the UNet's space")
    target = model_dir / "vae"
    if target.is_symlink() or target.is_file():
        target.unlink()
    else:
        shutil.rmtree(target)
    target.symlink_to(vae_dir.resolve())
    return str(vae_dir)


def hub_files_to_fetch(files: list[str], index: dict) -> list[str]:
    """Of a Hub repo's files: model_index.json and, per component it lists, its settings files and
    one set of weights (plain safetensors, else plain .bin, else the fp16 variant), not the
    single-file checkpoints, non-EMA or ONNX copies beside them."""
    chosen = ["model_index.json"]
    for name in listed_components(index):
        inside = [f for f in files if f.startswith(f"{name}/") and f.count("/") == 1]
        weights = [f for f in inside if is_weights(f) and "non_ema" not in f]
        chosen += [f for f in inside if not is_weights(f)]
        variant = preferred_variant({file_variant(f) for f in weights}) or ""
        of_variant = [f for f in weights if file_variant(f) == variant]
        safetensors = [f for f in of_variant if f.endswith(".safetensors")]
        chosen += safetensors or of_variant
    return chosen


def download_hub(repo_id: str, revision: str | None, tmp: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
        index = json.loads(Path(hf_hub_download(repo_id, "model_index.json", revision=revision)).read_text())
        snapshot_download(repo_id, revision=revision, local_dir=tmp, allow_patterns=hub_files_to_fetch(files, index))
    except Exception as e:
        raise ValueError(f"model.pretrained: could not download {repo_id!r} from the Hugging Face Hub: {e}") from e


def fetch_model(cfg: Config, out: Path, data_dir: Path | None) -> dict:
    ref = cfg.model.pretrained
    started = time.time()
    report: dict = {"pretrained": ref}
    with atomic_dir(out) as tmp:
        if ref in TINY_BUILTINS:
            if data_dir is None:
                raise ValueError(f"{ref} is fitted on the data set: pass --data <prepared data folder>")
            images, captions = load_prepared(data_dir, BUILTIN_RESOLUTIONS[ref])
            tiny = cfg.model.tiny
            report |= FAMILIES[TINY_BUILTINS[ref]].build_tiny(tmp, images, captions, tiny.vae_steps, tiny.vae_batch,
                                                              tiny.seed)
        elif ref in ARCH_BUILTINS:
            import importlib

            module, function = ARCH_BUILTINS[ref].split(":")
            report |= getattr(importlib.import_module(module), function)(tmp)
        elif ref.startswith("builtin:"):
            raise ValueError(f"model.pretrained: unknown builtin model {ref!r}; available: "
                             f"{', '.join([*TINY_BUILTINS, *ARCH_BUILTINS])}")
        elif Path(ref).expanduser().is_dir():
            link_local(check_model_dir(Path(ref).expanduser()), tmp)
        elif model_source(ref).kind == "file":
            from .single_file import convert

            report |= convert(Path(ref).expanduser(), tmp, Path(cfg.model.config_from).expanduser()
                              if cfg.model.config_from else None)
        else:  # model_source has refused anything else
            download_hub(ref, cfg.model.revision, tmp)
        if cfg.model.vae:
            report["vae"] = replace_vae(tmp, Path(cfg.model.vae).expanduser())
        check_model_dir(tmp)
        report["seconds"] = round(time.time() - started, 1)
        write_json(tmp / "fetch.json", report)
    print(f"fetch_model: {ref} -> {out} {report}")
    return report


def main(argv: list[str] | None = None) -> None:
    args, cfg = stage_main("fetch_model", __doc__, argv, {"out": "output model folder"}, {"data": "prepared data folder (builtin:tiny)"})
    fetch_model(cfg, Path(args.out), Path(args.data) if args.data else None)


if __name__ == "__main__":
    run(main)
