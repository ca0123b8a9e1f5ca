"""Key tables: diffusers state dicts -> the original (CompVis ldm / Stability sgm) single-file layout.

diffusers ships the other direction (`diffusers.loaders.single_file_utils`, what `from_single_file`
runs) but not this one, so the tables are written here, once, as data: rows of (diffusers prefix,
original prefix, renames inside the block), generated from a model's own config so any depth or
width maps (SD 1.x, SD 2.x, SDXL, the tiny test models). tests/test_export.py maps every key of each
family's state dicts through these tables and back through diffusers' own converters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Inside a UNet ResNet block: diffusers name -> ldm name.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL's added conditions
VAE_TOP = {"encoder.conv_in": "encoder.conv_in", "encoder.conv_out": "encoder.conv_out",
           "encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_in": "decoder.conv_in",
           "decoder.conv_out": "decoder.conv_out", "decoder.conv_norm_out": "decoder.norm_out",
           "quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
# HF CLIP text model -> OpenCLIP's text tower (SD 2.x, SDXL's second encoder).
OPENCLIP_TOP = {"text_model.embeddings.token_embedding": "token_embedding",
                "text_model.final_layer_norm": "ln_final"}
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}


@dataclass(frozen=True)
class Row:
    diffusers: str
    original: str
    inner: dict[str, str] = field(default_factory=dict)
    conv1x1: bool = False  # diffusers' linear weight is a 1x1 convolution in the original


def unet_rows(config: dict) -> list[Row]:
    """The UNet's blocks: ldm numbers input_blocks/output_blocks consecutively, one entry per
    (ResNet [+ attention]) layer and one per down/upsampler."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"unet layers_per_block {layers!r}: the original layout needs one count for every block")
    rows = [Row(d, o) for d, o in UNET_TOP.items()]
    per_down = layers + 1  # the layers, then the downsampler
    for b in range(len(config["down_block_types"])):
        for j in range(layers):
            i = 1 + b * per_down + j
            rows += [Row(f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0", UNET_RESNET),
                     Row(f"down_blocks.{b}.attentions.{j}", f"input_blocks.{i}.1")]
        rows.append(Row(f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{1 + b * per_down + layers}.0.op"))
    rows += [Row("mid_block.resnets.0", "middle_block.0", UNET_RESNET), Row("mid_block.attentions.0", "middle_block.1"),
             Row("mid_block.resnets.1", "middle_block.2", UNET_RESNET)]
    per_up = layers + 1  # up blocks have one layer more; the upsampler sits in the last one
    for b, block_type in enumerate(config["up_block_types"]):
        for j in range(per_up):
            i = b * per_up + j
            rows += [Row(f"up_blocks.{b}.resnets.{j}", f"output_blocks.{i}.0", UNET_RESNET),
                     Row(f"up_blocks.{b}.attentions.{j}", f"output_blocks.{i}.1")]
        after = 2 if "CrossAttn" in block_type else 1
        rows.append(Row(f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{b * per_up + layers}.{after}.conv"))
    return rows


def vae_rows(config: dict) -> list[Row]:
    """The VAE: ldm numbers the decoder's up blocks from the lowest resolution's end."""
    rows = [Row(d, o) for d, o in VAE_TOP.items()]
    n = len(config["down_block_types"])
    for b in range(n):
        rows += [Row(f"encoder.down_blocks.{b}.resnets", f"encoder.down.{b}.block", VAE_RESNET),
                 Row(f"encoder.down_blocks.{b}.downsamplers.0.conv", f"encoder.down.{b}.downsample.conv")]
    for b in range(len(config["up_block_types"])):
        rows += [Row(f"decoder.up_blocks.{b}.resnets", f"decoder.up.{n - 1 - b}.block", VAE_RESNET),
                 Row(f"decoder.up_blocks.{b}.upsamplers.0.conv", f"decoder.up.{n - 1 - b}.upsample.conv")]
    for part in ("encoder", "decoder"):
        rows += [Row(f"{part}.mid_block.resnets.{k}", f"{part}.mid.block_{k + 1}", VAE_RESNET) for k in (0, 1)]
        rows.append(Row(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION, conv1x1=True))
    return rows


def _rename(rest: str, inner: dict[str, str]) -> str:
    for old in sorted(inner, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return inner[old] + rest[len(old):]
    return rest


def convert(state_dict: dict[str, torch.Tensor], rows: list[Row], prefix: str, what: str) -> dict[str, torch.Tensor]:
    """`state_dict` renamed by `rows` (the longest matching diffusers prefix wins), under `prefix`.
    A key no row covers is an error: a single file missing weights would load half-random."""
    ordered = sorted(rows, key=lambda r: len(r.diffusers), reverse=True)
    out, unmapped = {}, []
    for key, value in state_dict.items():
        row = next((r for r in ordered if key.startswith(r.diffusers + ".")), None)
        if row is None:
            unmapped.append(key)
            continue
        rest = _rename(key[len(row.diffusers) + 1:], row.inner)
        if row.conv1x1 and rest.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[f"{prefix}{row.original}.{rest}"] = value
    if unmapped:
        raise ValueError(f"{what}: {len(unmapped)} weights have no place in the original layout, e.g. {unmapped[:3]}")
    return out


def text_model_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP keys as the original checkpoints have them, under `text_model.`: transformers 5 saves
    CLIPTextModel without that level (CLIPTextModelWithProjection keeps it)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in state_dict.items() if not k.endswith("position_ids")}


def clip_to_original(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A HF CLIP text model keeps its own key names in the original layout, under `prefix`."""
    return {prefix + k: v for k, v in text_model_keys(state_dict).items()}


def openclip_to_original(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A HF CLIP text model in OpenCLIP's layout: q/k/v fused into in_proj, `resblocks`, the
    positional embedding a bare tensor, the projection transposed."""
    state_dict = text_model_keys(state_dict)
    out, unmapped = {}, []
    for key, value in state_dict.items():
        if key == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            layer, rest = key[len("text_model.encoder.layers."):].split(".", 1)
            base = f"{prefix}transformer.resblocks.{layer}."
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                parts = [state_dict[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"{base}attn.in_proj_{kind}"] = torch.cat(parts)
            elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                continue  # fused with q above
            else:
                renamed = _rename(rest, OPENCLIP_LAYER)
                (unmapped.append(key) if renamed == rest else out.__setitem__(base + renamed, value))
        else:
            top = next((t for t in OPENCLIP_TOP if key.startswith(t + ".")), None)
            if top is None:
                unmapped.append(key)
            else:
                out[prefix + OPENCLIP_TOP[top] + key[len(top):]] = value
    if unmapped:
        raise ValueError(f"text encoder: {len(unmapped)} weights have no place in OpenCLIP's layout, e.g. {unmapped[:3]}")
    return out
