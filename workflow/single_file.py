"""Single-file checkpoints (what A1111, ComfyUI and Civitai use) -> a diffusers folder, offline.

diffusers' `from_single_file` converts the original-layout keys; it needs a diffusers folder without
weights that describes the model (model_index.json, each component's config, the tokenizers). That
folder comes from `model.config_from` (a local diffusers folder of the same family, e.g. a copy of
stable-diffusion-v1-5) or, by default, is written here for the family the checkpoint's keys show
(families.family_of_checkpoint): the released models' architectures (models.ARCH_UNETS and the text
encoders beside them), and CLIP tokenizers built from the BPE vocabulary that OpenAI's CLIP tokenizer
was made from, as the open_clip_torch package ships it (bpe_simple_vocab_16e6.txt.gz; installed
without its dependencies, only that file is read). A .ckpt is read with torch's weights-only loader
and rewritten as safetensors first: its pickle is never run.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

import torch

from .families import Family, family_of_checkpoint
from .inputs import checkpoint_shapes, load_ckpt_state, single_file_geometry
from .models import ARCH_UNETS, CLIP_L, OPENCLIP_BIGG

CLIP_BPE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2  # the merges OpenAI's tokenizer uses: vocabulary 49408 = 2 x 256 bytes + merges + 2
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of GPT-2's and CLIP's byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def clip_bpe_file() -> Path:
    """open_clip_torch's packaged vocabulary, found without importing the package (its imports need
    torchvision and timm, which this project does not install)."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(next(iter(spec.submodule_search_locations))) / CLIP_BPE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{CLIP_BPE} (open_clip_torch) is not installed: `make install` installs it; or "
                                f"name a diffusers folder with its tokenizers in model.config_from")
    return path


def write_clip_tokenizer(folder: Path, pad_token: str) -> None:
    """A CLIPTokenizer folder (vocab.json, merges.txt, configs) equal to OpenAI's CLIP tokenizer: the
    vocabulary is the bytes, the bytes ending a word, the merges and the two special tokens, in that order."""
    merges = gzip.open(clip_bpe_file()).read().decode("utf-8").split("\n")[1 : CLIP_MERGES + 1]
    letters = list(bytes_to_unicode().values())
    vocab = letters + [c + "</w>" for c in letters] + ["".join(m.split()) for m in merges] + \
        ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        specials | {"model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}))


# The released models' text encoders (transformers' CLIPTextConfig arguments): CLIP ViT-L, OpenCLIP
# ViT-H without its last layer (SD 2.x folders drop it), OpenCLIP ViT-bigG with its projection.
OPENCLIP_H_PENULTIMATE = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                          "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}
TEXT_ENCODERS = {"sd1": [("CLIPTextModel", CLIP_L | {"projection_dim": 768})],
                 "sd2": [("CLIPTextModel", OPENCLIP_H_PENULTIMATE)],
                 "sdxl": [("CLIPTextModel", CLIP_L | {"projection_dim": 768}),
                          ("CLIPTextModelWithProjection", OPENCLIP_BIGG | {"projection_dim": 1280})]}


def unet_arguments(family: Family, resolution: int) -> dict:
    if family.name == "sdxl":
        return dict(ARCH_UNETS["builtin:sdxl-arch"])
    if family.name == "sd1":
        return dict(ARCH_UNETS["builtin:sd15-arch"])
    return {"sample_size": resolution // 8, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True, "upcast_attention": resolution == 768}  # SD 2.1-768 upcasts in fp16


def write_family_config(folder: Path, family: Family, resolution: int, prediction_type: str) -> Path:
    """A diffusers folder without weights describing a released model of `family` (configs only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    with torch.device("meta"):
        UNet2DConditionModel(**unet_arguments(family, resolution)).save_config(folder / "unet")
        vae = {"sdxl": {"scaling_factor": 0.13025, "force_upcast": True}}.get(family.name, {"scaling_factor": 0.18215})
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=resolution,
                      **vae).save_config(folder / "vae")
    index = {"_class_name": family.pipeline, "_diffusers_version": "0.42.1"}
    for layout, (cls, shape) in zip(family.text_encoders, TEXT_ENCODERS[family.name]):
        config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                                pad_token_id=49407 if layout.pad_token != "!" else 0, **shape)
        config.architectures = [cls]
        config.save_pretrained(folder / layout.folder)
        write_clip_tokenizer(folder / layout.tokenizer, layout.pad_token)
        index |= {layout.folder: ["transformers", cls], layout.tokenizer: ["transformers", "CLIPTokenizer"]}
    scheduler = "EulerDiscreteScheduler" if family.name == "sdxl" else "DDIMScheduler"
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": scheduler, **SD_BETAS, "prediction_type": prediction_type, "steps_offset": 1,
         "clip_sample": False, "set_alpha_to_one": False, "timestep_spacing": "leading"}))
    index |= {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
              "scheduler": ["diffusers", scheduler]}
    if family.name == "sdxl":
        index["force_zeros_for_empty_prompt"] = True
    else:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def convert(checkpoint: Path, out: Path, config_from: Path | None = None) -> dict:
    """The checkpoint as a diffusers folder in `out` (fp32 safetensors, as the stages load folders)."""
    import diffusers
    from safetensors.torch import save_file

    family = family_of_checkpoint(checkpoint_shapes(checkpoint), f"model.pretrained {checkpoint}")
    resolution, prediction_type = single_file_geometry(checkpoint, family)
    with tempfile.TemporaryDirectory(prefix="single-file-") as scratch:
        scratch = Path(scratch)
        if config_from is None:
            config = write_family_config(scratch / "config", family, resolution, prediction_type)
            described = f"the project's {family.name} configs, tokenizers from open_clip_torch's {CLIP_BPE}"
        else:
            config, described = config_from, f"model.config_from {config_from}"
        source = checkpoint
        if checkpoint.suffix == ".ckpt":
            state = {k: v.contiguous().clone() for k, v in load_ckpt_state(checkpoint).items()
                     if isinstance(v, torch.Tensor)}
            source = scratch / "checkpoint.safetensors"
            save_file(state, source)
            del state
        pipeline = getattr(diffusers, family.pipeline).from_single_file(
            str(source), config=str(config), local_files_only=True, torch_dtype=torch.float32)
        pipeline.save_pretrained(out, safe_serialization=True)
    return {"single_file": str(checkpoint), "family": family.name, "resolution": resolution,
            "prediction_type": prediction_type, "configs": described}
