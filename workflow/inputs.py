"""The run's inputs, checked when the workflow is read (so `snakemake -n` already names a wrong one)
and again by the stages that use them: the model (a builtin, a diffusers folder of a known family, a
single-file checkpoint, or a Hub id), the data set and the prior images. Nothing here imports torch:
the Snakefile calls it on every `snakemake` command.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ConfigError
from .families import (BUILTIN_FAMILIES, BUILTIN_RESOLUTIONS, FAMILIES, Family, UnknownModel, family_of,
                       family_of_checkpoint, native_resolution)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
REQUIRED_SUBFOLDERS = ("vae", "scheduler")  # and the family's denoiser and text encoders
BUILTIN_DATA = ("digits", "digits-aspect", "sevens")
# Single-file checkpoints' sizes (diffusers' single_file_utils: the family's default pipeline).
SINGLE_FILE_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}


@dataclass(frozen=True)
class ModelSource:
    """What `model.pretrained` names: kind (builtin, folder, file, hub), its family and resolution
    where they are known before fetch_model runs (not for a Hub id)."""

    kind: str
    family: Family | None
    resolution: int | None
    prediction_type: str | None = None  # single files: what the checkpoint was trained for


def model_source(ref: str) -> ModelSource:
    if ref.startswith("builtin:"):
        if ref not in BUILTIN_FAMILIES:
            raise ConfigError(f"model.pretrained: unknown builtin model {ref!r}; available: "
                              f"{', '.join(BUILTIN_FAMILIES)}")
        return ModelSource("builtin", FAMILIES[BUILTIN_FAMILIES[ref]], BUILTIN_RESOLUTIONS[ref])
    path = Path(ref).expanduser()
    if path.is_dir():
        check_model_dir(path)
        return ModelSource("folder", family_of(path), native_resolution(path))
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ConfigError(f"model.pretrained: {path} is a file but not a checkpoint (.safetensors or .ckpt)")
        family = family_of_checkpoint(checkpoint_shapes(path), f"model.pretrained {path}")
        resolution, prediction = single_file_geometry(path, family)
        return ModelSource("file", family, resolution, prediction)
    if looks_local(ref):
        raise ConfigError(f"model.pretrained: {ref} does not exist (a local path: the nearest folder that exists is "
                          f"{first_existing_parent(path)}; a Hub id would be org/name with no such folder here)")
    if HUB_ID.match(ref):
        return ModelSource("hub", None, None)
    raise ConfigError(f"model.pretrained: {ref!r} is neither a builtin, a local folder or checkpoint, nor a Hub id "
                      f"(org/name)")


def looks_local(ref: str) -> bool:
    """A path the user meant as local: absolute, ~, ./, a checkpoint file name, or one whose first
    folder exists here (models/sd15 beside a models/ folder), which a Hub id would never be."""
    if ref.startswith(("/", "~", "./", "../")) or ref.endswith(CHECKPOINT_SUFFIXES):
        return True
    first = ref.split("/", 1)[0]
    return "/" in ref and Path(first).is_dir()


def first_existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_model_dir(path: str | Path) -> Path:
    """A diffusers folder of a known family with every component its family needs, or a clear error
    naming what is missing (and what the folder holds instead)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if not (path / "model_index.json").is_file():
        found = sorted(p.name for p in path.iterdir())[:8]
        checkpoints = [n for n in found if n.endswith(CHECKPOINT_SUFFIXES)]
        hint = (f"; for a single-file checkpoint name the file: model__pretrained={path / checkpoints[0]}" if checkpoints
                else "")
        raise FileNotFoundError(f"model folder {path} is not a diffusers pipeline: no model_index.json (it holds "
                                f"{', '.join(found) or 'nothing'}){hint}")
    try:
        family = family_of(path)
    except UnknownModel as e:
        raise ConfigError(str(e)) from None
    wanted = [family.denoiser, *REQUIRED_SUBFOLDERS]
    for layout in family.text_encoders:
        wanted += [layout.folder, layout.tokenizer]
    missing = [d + "/" for d in wanted if not (path / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"model folder {path} is not a diffusers pipeline: missing {', '.join(missing)}")
    return path


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a single-file checkpoint, without reading the tensors: the header of
    a .safetensors file; for a .ckpt (a pickle), torch's weights-only loader on a memory map, which
    refuses anything but tensors and plain containers."""
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConfigError(f"model.pretrained {path}: not a safetensors file (too short)")
            size = struct.unpack("<Q", head)[0]
            try:
                header = json.loads(f.read(size))
            except (ValueError, UnicodeDecodeError, MemoryError):
                raise ConfigError(f"model.pretrained {path}: not a safetensors file (unreadable header)") from None
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    state = load_ckpt_state(path)
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def load_ckpt_state(path: Path) -> dict:
    """A .ckpt's state dict (tensors only: torch.load(weights_only=True)); under `state_dict` where the
    original trainers put it."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # the weights-only unpickler refusing code, or not a torch file at all
        raise ConfigError(f"model.pretrained {path}: not a checkpoint torch's weights-only loader reads ({e}); "
                          f"a .ckpt holding code is refused, convert it to .safetensors where you trust it") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"model.pretrained {path}: holds no state dict")
    return state


def single_file_geometry(path: Path, family: Family) -> tuple[int, str | None]:
    """(resolution, prediction type) of a single-file checkpoint. SD 2.x files do not say whether they
    are the 768 px v-prediction or the 512 px epsilon model: an original config beside the file (what
    A1111 reads: `<name>.yaml`) decides; without one the 768 px v-prediction model is assumed, as
    diffusers' single-file loader does."""
    if family.name != "sd2":
        return SINGLE_FILE_RESOLUTION[family.name], "epsilon"
    beside = path.with_suffix(".yaml")
    if beside.is_file():
        import yaml

        params = (yaml.safe_load(beside.read_text()) or {}).get("model", {}).get("params", {})
        v = params.get("parameterization") == "v"
        size = params.get("unet_config", {}).get("params", {}).get("image_size")
        return (int(size) * 8 if size else 768 if v else 512), "v_prediction" if v else "epsilon"
    return 768, "v_prediction"


# ---------------------------------------------------------------- data


def check_source(source: str, key: str, caption: str | None) -> None:
    """A data source that can give at least one usable, captioned image, or an error naming the fix."""
    from .sources import IMAGE_EXTS

    scheme, _, arg = source.partition(":")
    if scheme == "builtin":
        if arg not in BUILTIN_DATA:
            raise ConfigError(f"{key}: unknown builtin data set {arg!r}; available: "
                              + ", ".join(f"builtin:{n}" for n in BUILTIN_DATA))
        return
    path = Path(arg).expanduser()
    if scheme == "imagefolder":
        if not path.is_dir():
            raise ConfigError(f"{key}: image folder {path} does not exist")
        images = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()]
        if not images:
            raise ConfigError(f"{key}: image folder {path} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
        fixed_caption = caption and "{caption}" not in caption
        if fixed_caption:
            return
        metadata = [*path.rglob("metadata.jsonl"), *path.rglob("metadata.csv")]
        if not metadata and not any(p.with_suffix(".txt").is_file() for p in images):
            setting = "data.caption" if key == "data.source" else "data.prior.caption"
            raise ConfigError(f"{key}: the {len(images)} images in {path} have no captions: add metadata.jsonl "
                              f"({{\"file_name\": ..., \"text\": ...}} per line), metadata.csv or a .txt beside each "
                              f"image, or caption them all with {setting} (e.g. \"a photo of sks dog\")")
        return
    if scheme == "hf":
        if path.exists() or looks_local(arg):
            if not path.exists():
                raise ConfigError(f"{key}: {path} does not exist (a local path; a Hub data set is hf:org/name)")
            files = [p for p in path.rglob("*") if p.is_file()]
            if not any(p.suffix in (".parquet", ".arrow", ".json", ".jsonl", ".csv") or p.name == "dataset_info.json"
                       for p in files):
                raise ConfigError(f"{key}: {path} holds no data set files (parquet, arrow, a save_to_disk folder)")
            return
        if not HUB_ID.match(arg):
            raise ConfigError(f"{key}: hf:{arg} is neither a local folder nor a Hub data set id (org/name)")
        return
    if scheme == "wds":
        import glob

        import braceexpand

        patterns = list(braceexpand.braceexpand(os.path.expanduser(arg)))
        missing = [p for p in patterns if not (glob.glob(p) if glob.has_magic(p) else Path(p).is_file())]
        if missing:
            raise ConfigError(f"{key}: {len(missing)} of {len(patterns)} tar file(s) not found, e.g. {missing[0]}")


def check_inputs(cfg: Config) -> ModelSource:
    """Every input the run reads, checked before anything runs; the model's source for `auto`."""
    model = model_source(cfg.model.pretrained)
    if cfg.model.config_from:
        check_model_dir(Path(cfg.model.config_from).expanduser())
        if model.kind != "file":
            raise ConfigError("model.config_from describes single-file checkpoints; model.pretrained is not one")
    if cfg.model.vae and not (Path(cfg.model.vae).expanduser() / "config.json").is_file():
        raise ConfigError(f"model.vae: {cfg.model.vae} is not a diffusers VAE folder (no config.json)")
    d = cfg.data
    check_source(d.source, "data.source", d.caption)
    if d.prior.source and not d.prior.generated:
        check_source(d.prior.source, "data.prior.source", d.prior.caption)
    return model
