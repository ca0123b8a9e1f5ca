"""The export stage: single-file checkpoints and kohya LoRA files, checked by loaders nobody here wrote
(diffusers' from_single_file and its kohya reader, diffusers' original-layout converters)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import LORA_RUN, SHARED_RUN, run_stage, tiny_config
from documented import copy_repo, jobs, user_env
from safetensors import safe_open

from workflow.families import FAMILIES, UNET_PREFIX, VAE_PREFIX, family_of
from workflow.original_layout import (clip_to_original, convert, openclip_to_original, text_model_keys, unet_rows,
                                      vae_rows)


# ---------------------------------------------------------------- key tables, every family (no processes)


def tiny_family_models(family: str):
    """(unet, vae, [text encoders]) shaped like `family` at toy size: SD 2.x's linear attention
    projections and per-block heads, SDXL's added text/time conditions, two-layer transformers and
    a projected second text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=8, latent_channels=4)
    common = dict(sample_size=8, block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32)
    if family == "sd1":
        unet = UNet2DConditionModel(**common, layers_per_block=1, attention_head_dim=4,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        encoders = [CLIPTextModel(CLIPTextConfig(**text))]
    elif family == "sd2":
        unet = UNet2DConditionModel(**common, layers_per_block=2, attention_head_dim=(2, 4), use_linear_projection=True,
                                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
        encoders = [CLIPTextModel(CLIPTextConfig(**text, hidden_act="gelu"))]
    else:
        unet = UNet2DConditionModel(**common, layers_per_block=2, attention_head_dim=(2, 4), use_linear_projection=True,
                                    transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        encoders = [CLIPTextModel(CLIPTextConfig(**text)),
                    CLIPTextModelWithProjection(CLIPTextConfig(**text, hidden_act="gelu", projection_dim=16))]
    return unet, vae, encoders


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_key_maps_to_the_original_layout_and_back(family):
    """diffusers -> original (our tables) -> diffusers (diffusers' own converters, what
    from_single_file runs) gives every tensor back under its own name. Bugs caught: a table row that
    sends a block to the wrong input/output index (ResNets of SDXL's 2-layer blocks, the upsampler
    after an attention), a missed rename (VAE attention q/k/v, OpenCLIP's fused in_proj), a dropped key."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    fam = FAMILIES[family]
    unet, vae, encoders = tiny_family_models(family)

    def same(original: dict, back: dict, what: str) -> None:
        assert set(back) == set(original), f"{what}: {sorted(set(original) ^ set(back))[:5]}"
        differ = [k for k in original if not torch.equal(original[k], back[k].reshape(original[k].shape))]
        assert not differ, f"{what}: {differ[:5]}"

    sd = unet.state_dict()
    single = convert(sd, unet_rows(dict(unet.config)), UNET_PREFIX, "unet")
    assert len(single) == len(sd) and all(k.startswith(UNET_PREFIX) for k in single)
    same(sd, convert_ldm_unet_checkpoint(single, dict(unet.config)), "unet")
    if family == "sdxl":
        assert f"{UNET_PREFIX}label_emb.0.0.weight" in single and f"{UNET_PREFIX}input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight" in single

    sd = vae.state_dict()
    single = convert(sd, vae_rows(dict(vae.config)), VAE_PREFIX, "vae")
    assert single[f"{VAE_PREFIX}encoder.mid.attn_1.q.weight"].dim() == 4  # a 1x1 convolution there
    same(sd, convert_ldm_vae_checkpoint(single, dict(vae.config)), "vae")

    assert len(fam.text_encoders) == len(encoders)
    for layout, encoder in zip(fam.text_encoders, encoders):
        sd = text_model_keys(encoder.state_dict())
        if layout.openclip:
            single = openclip_to_original(encoder.state_dict(), layout.prefix)
            assert f"{layout.prefix}transformer.resblocks.1.attn.in_proj_weight" in single
            back = convert_open_clip_checkpoint(encoder, single, prefix=layout.prefix)
        else:
            single = clip_to_original(encoder.state_dict(), layout.prefix)
            back = convert_ldm_clip_checkpoint(single)
        same(sd, back, layout.folder)


def test_a_weight_without_a_place_is_an_error():
    unet, _, _ = tiny_family_models("sd1")
    sd = unet.state_dict() | {"brand_new_block.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="1 weights have no place.*brand_new_block"):
        convert(sd, unet_rows(dict(unet.config)), UNET_PREFIX, "unet")


# ---------------------------------------------------------------- the stage on 2-rank runs


def export_run(built, run_dir: Path, out: Path, *overrides: str, check: bool = True, extra: tuple = ()):
    return run_stage("export", tiny_config(*overrides), "--model", str(run_dir / "model"), "--base-model",
                     str(built["model"]), "--run-dir", str(run_dir), "--data", str(built["data"]), "--out", str(out),
                     *extra, check=check)


def snakemake_export(built, run_dir: Path, tmp_path: Path, *overrides: str) -> Path:
    """`snakemake --cores 2 --until export` in a repo copy whose config.yaml is the run's config and
    whose results/ already hold its data, model, cache and trained, merged run (copied with their
    times, oldest first): Snakemake must find only `export` to run. Returns the export folder."""
    cfg = tiny_config(*overrides)
    repo = copy_repo(tmp_path / "repo")
    (repo / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run = repo / "results" / "runs" / cfg.run
    for src, dst in ((built["data"], f"results/data/{cfg.dataset_name}"), (built["model"], f"resources/models/{cfg.model_name}"),
                     (built["latents"], f"results/latents/{cfg.dataset_name}/{cfg.encoder_key}"), (run_dir, run)):
        shutil.copytree(src, repo / dst, symlinks=True)
    proc = subprocess.run(["snakemake", "--cores", "2", "--until", "export"], cwd=repo, env=user_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert jobs(proc) == {"export"}, proc.stderr[-3000:]
    return run / "export"


def fixed_inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([100, 700]), torch.randn(2, 16, 64, generator=gen)


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_single_file_checkpoint_loads_in_from_single_file(built, zero_runs, tmp_path):
    """A 2-rank ZeRO-3 run exported in fp16 through Snakemake: diffusers' from_single_file (given the base folder for
    configs and tokenizer, offline) loads every UNet, VAE and text encoder weight, and each predicts
    what the merged folder predicts within fp16 rounding. The v-prediction .yaml beside it is an
    original config diffusers reads (it builds the same UNet, v parameterization). Bugs caught: keys
    that from_single_file silently leaves at their initial values, a wrong fp16 cast, a yaml that
    describes another architecture."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = snakemake_export(built, zero_runs[3], tmp_path, *SHARED_RUN, "train.zero_stage=3")
    report = json.loads((out / "export.json").read_text())
    assert report["family"] == "sd1" and set(report["files"]) == {"digits-tiny.safetensors", "digits-tiny.yaml"}
    assert report["skipped"] == {"kohya_lora": "a full fine-tune has no LoRA"}
    file = out / "digits-tiny.safetensors"
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F16"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys  # A1111's SD 1.x keys

    meta = header(file)
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.resolution"] == "32x32"
    assert meta["ss_max_train_steps"] == "4" and meta["ss_num_train_images"] == "1797" and meta["ss_learning_rate"] == "0.001"
    assert meta["modelspec.hash_sha256"] == report["files"]["digits-tiny.safetensors"]["hash_sha256"]
    assert not any(str(tmp_path) in v or "/tmp" in v for v in meta.values())  # no paths

    merged = StableDiffusionPipeline.from_pretrained(zero_runs[3] / "model", safety_checker=None, requires_safety_checker=False)
    single = StableDiffusionPipeline.from_single_file(str(file), config=str(built["model"]), torch_dtype=torch.float32,
                                                      local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(merged, name).state_dict(), getattr(single, name).state_dict()
        assert set(got) == set(want), name
        differ = [k for k in want if not torch.equal(want[k].half().float(), got[k])]
        assert not differ, f"{name}: {len(differ)} weights differ from the merged folder's (fp16-rounded), e.g. {differ[:3]}"
    x, t, text = fixed_inputs()
    with torch.no_grad():
        torch.testing.assert_close(single.unet(x, t, text).sample, merged.unet(x, t, text).sample, atol=2e-2, rtol=0)
        torch.testing.assert_close(single.vae.decode(x).sample, merged.vae.decode(x).sample, atol=2e-2, rtol=0)
        ids = merged.tokenizer(["a handwritten digit 3"], padding="max_length", return_tensors="pt").input_ids
        torch.testing.assert_close(single.text_encoder(ids)[0], merged.text_encoder(ids)[0], atol=2e-2, rtol=0)

    original = yaml.safe_load((out / "digits-tiny.yaml").read_text())
    assert original["model"]["params"]["parameterization"] == "v"
    from_yaml = UNet2DConditionModel.from_single_file(str(file), original_config=str(out / "digits-tiny.yaml"),
                                                      torch_dtype=torch.float32)
    assert from_yaml.config.block_out_channels == merged.unet.config.block_out_channels
    with torch.no_grad():
        torch.testing.assert_close(from_yaml(x, t, text).sample, single.unet(x, t, text).sample, atol=0, rtol=0)


def test_kohya_lora_keeps_its_alpha_and_loads_like_the_peft_file(built, lora_run, tmp_path):
    """The 2-rank ZeRO-2 LoRA run (rank 4, alpha 8: scale 2) exported through Snakemake: kohya keys with alpha 8, and
    diffusers' load_lora_weights reading the kohya file gives the UNet the peft file gives it.
    Bug caught: alpha written as the rank (diffusers' converter does that): the LoRA then loads at
    half strength. The fused model is exported as a checkpoint too."""
    from diffusers import StableDiffusionPipeline

    # fp32, so that the comparison below is of the conversion, not of fp16 rounding: with adapters
    # trained at lr 5e-2, fp16 weights moved the prediction by up to 4.5 % of the LoRA's effect
    # (the checkpoint test covers the fp16 default).
    out = snakemake_export(built, lora_run, tmp_path, *LORA_RUN, "export.dtype=fp32")
    report = json.loads((out / "export.json").read_text())
    lora_file = out / "digits-tiny_lora.safetensors"
    # the LoRA file and (ema.fuse_lora) the fused checkpoint, named after the run (auto: digits-tiny-lora)
    assert report["files"]["digits-tiny_lora.safetensors"]["alpha"] == 8 and "digits-tiny-lora.safetensors" in report["files"]
    with safe_open(str(lora_file), "pt") as f:
        keys = list(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    with safe_open(str(lora_run / "model" / "pytorch_lora_weights.safetensors"), "pt") as f:
        modules = len([k for k in f.keys() if k.endswith("lora.down.weight")])
    downs = [k for k in keys if k.endswith(".lora_down.weight")]
    assert alphas == {8.0} and len(downs) == len([k for k in keys if k.endswith(".alpha")]) == modules
    assert all(k.startswith("lora_unet_") for k in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    meta = header(lora_file)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_network_alpha"] == "8"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_module"] == "networks.lora"

    load = dict(safety_checker=None, requires_safety_checker=False)
    x, t, text = fixed_inputs()

    def predict(lora: Path) -> torch.Tensor:
        pipe = StableDiffusionPipeline.from_pretrained(built["model"], **load)
        pipe.load_lora_weights(lora)
        with torch.no_grad():
            return pipe.unet(x, t, text).sample

    base = StableDiffusionPipeline.from_pretrained(built["model"], **load)
    with torch.no_grad():
        before = base.unet(x, t, text).sample
    peft, kohya = predict(lora_run / "model"), predict(lora_file)
    effect = (peft - before).abs().max()
    assert effect > 1e-2  # the adapters do something; half of it is what a lost alpha leaves
    torch.testing.assert_close(kohya, peft, atol=float(effect) * 1e-3, rtol=0)


def test_export_formats_off_and_bad_values(built, zero_runs, tmp_path):
    out = tmp_path / "none"
    export_run(built, zero_runs[0], out, *SHARED_RUN, "export.formats=[]")
    assert json.loads((out / "export.json").read_text())["files"] == {} and list(out.iterdir()) == [out / "export.json"]
    bad = export_run(built, zero_runs[0], tmp_path / "bad", *SHARED_RUN, check=False, extra=("--set", "export.dtype=fp8"))
    assert bad.returncode == 2 and "export.dtype" in bad.stderr and not (tmp_path / "bad").exists()


def test_family_is_read_from_the_folder(built, tmp_path):
    assert family_of(built["model"]).name == "sd1"
    for name, edit in (("sd2", ("text_encoder", {"hidden_act": "gelu"})), ("sdxl", ("unet", {"addition_embed_type": "text_time"}))):
        folder = tmp_path / name
        (folder / edit[0]).mkdir(parents=True)
        (folder / "model_index.json").write_text((built["model"] / "model_index.json").read_text())
        config = json.loads((built["model"] / edit[0] / "config.json").read_text()) | edit[1]
        (folder / edit[0] / "config.json").write_text(json.dumps(config))
        assert family_of(folder).name == name


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_original_yaml_describes_the_architecture(family, tmp_path):
    """The .yaml written beside a v-prediction checkpoint, read by diffusers' own original-config
    reader, gives back the UNet's architecture (SD 2.x: heads from num_head_channels, linear
    projections). Bug caught: a yaml A1111 would build another model from."""
    from diffusers import DDPMScheduler
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    from workflow.export import original_config_yaml

    unet, vae, _ = tiny_family_models(family)
    for name, part in (("unet", unet), ("vae", vae), ("scheduler", DDPMScheduler(prediction_type="v_prediction"))):
        part.save_config(tmp_path / name)
    original = yaml.safe_load(original_config_yaml(tmp_path, FAMILIES[family], "v_prediction"))
    assert original["model"]["params"]["parameterization"] == "v"
    rebuilt = create_unet_diffusers_config_from_ldm(original, {})
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types", "up_block_types",
                "in_channels", "out_channels", "attention_head_dim"):
        want, got = unet.config[key], rebuilt[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == \
            (list(want) if isinstance(want, (list, tuple)) else want), key
    assert rebuilt["use_linear_projection"] == (family == "sd2")
