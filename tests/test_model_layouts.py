"""Model folders as real Stable Diffusion 1.5 repos lay them out, through every stage.

Bugs this catches: a base whose model_index.json lists a safety checker and a feature extractor
(stable-diffusion-v1-5 does) failing to load because only unet/vae/text_encoder/tokenizer/scheduler
were linked; fp16-only weights (`diffusion_pytorch_model.fp16.safetensors`) not found; fp16 files
beside the fp32 ones loaded instead of the fp32 weights; a `.bin`-only text encoder; and a merged
model that dropped what the base had, so `from_pretrained` on it behaves differently than on the base.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_stage, tiny_config
from sd15_layout import sd15_layout

from workflow.models import load_text_encoder, load_denoiser, load_vae, pipeline_variant, weights_variant


@pytest.mark.e2e  # every stage, twice: make test-e2e
@pytest.mark.parametrize("layout", [
    dict(safety="tiny", fp16="beside", bin_te=True),   # stable-diffusion-v1-5 as downloaded
    dict(safety="null", fp16="only", bin_te=True),     # a fine-tuned repo: fp16 files only, no checker
])
def test_sd15_layout_through_every_stage(built, tmp_path, layout):
    from diffusers import StableDiffusionPipeline

    base = sd15_layout(built["model"], tmp_path / "stable-diffusion-v1-5", **layout)
    expected_variant = "fp16" if layout["fp16"] == "only" else None
    assert weights_variant(base / "unet") == expected_variant and pipeline_variant(base) == expected_variant
    # fp16 beside fp32: the fp32 weights are the ones loaded, bit for bit.
    original = load_denoiser(built["model"]).state_dict()
    loaded = load_denoiser(base).state_dict()
    if layout["fp16"] == "beside":
        assert all(torch.equal(original[k], loaded[k]) for k in original)
    else:
        assert all(torch.equal(original[k].half().float(), loaded[k]) for k in original)
    assert load_vae(base).dtype == torch.float32

    cfg = tiny_config(f"model.pretrained={base}", "train.steps=2", "train.procs=1", "train.checkpoint_every=2")
    model, latents, run_dir = tmp_path / "linked", tmp_path / "latents", tmp_path / "run"
    run_stage("fetch_model", cfg, "--out", str(model))
    assert not (model / "v1-5-pruned-emaonly.safetensors").exists()  # only the pipeline's parts
    assert (model / "safety_checker").is_dir() == (layout["safety"] == "tiny")
    run_stage("cache", cfg, "--data", str(built["data"]), "--model", str(model), "--out", str(latents))
    run_stage("train", cfg, "--latents", str(latents), "--model", str(model), "--data", str(built["data"]),
              "--run-dir", str(run_dir))
    run_stage("ema", cfg, "--model", str(model), "--run-dir", str(run_dir), "--out", str(run_dir / "model"))
    run_stage("sample", cfg, "--model", str(run_dir / "model"), "--base-model", str(model), "--latents", str(latents),
              "--run-dir", str(run_dir), "--out", str(run_dir / "samples"))
    assert json.loads((run_dir / "samples" / "metrics.json").read_text())["images"] == 4
    run_stage("export", cfg, "--model", str(run_dir / "model"), "--base-model", str(model), "--run-dir", str(run_dir),
              "--data", str(built["data"]), "--out", str(run_dir / "export"))
    exported = json.loads((run_dir / "export" / "export.json").read_text())["files"]
    weights = sum(len(load(run_dir / "model").state_dict()) for load in (load_denoiser, load_vae, load_text_encoder))
    assert exported[f"{cfg.run}.safetensors"]["tensors"] == weights  # every UNet, VAE and text encoder weight

    # The merged model keeps what the base had, so from_pretrained treats both alike.
    index = {name: json.loads((folder / "model_index.json").read_text()) for name, folder in
             (("base", base), ("merged", run_dir / "model"))}
    for key in ("safety_checker", "feature_extractor", "requires_safety_checker", "scheduler", "text_encoder"):
        assert index["merged"][key] == index["base"][key], key
    merged = StableDiffusionPipeline.from_pretrained(run_dir / "model")
    reference = StableDiffusionPipeline.from_pretrained(base, variant=pipeline_variant(base))
    assert type(merged.safety_checker) is type(reference.safety_checker)
    assert type(merged.feature_extractor) is type(reference.feature_extractor)
    scheduler = {k: v for k, v in merged.scheduler.config.items() if not k.startswith("_")}
    assert scheduler == {k: v for k, v in reference.scheduler.config.items() if not k.startswith("_")}
    assert not torch.equal(merged.unet.state_dict()["conv_in.weight"], reference.unet.state_dict()["conv_in.weight"])


def test_hub_download_takes_one_weights_set_per_listed_component():
    """What fetch_model asks the Hub for, given stable-diffusion-v1-5's file list (bug caught: only
    five fixed subfolders were downloaded, so the listed safety checker and feature extractor were
    missing and the folder did not load; and `*.bin` was skipped, so a .bin-only encoder was lost)."""
    from workflow.fetch_model import hub_files_to_fetch

    weights = [f"{name}.{ext}" for name in ("diffusion_pytorch_model", "diffusion_pytorch_model.fp16")
               for ext in ("safetensors", "bin")]
    files = ["model_index.json", "README.md", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors",
             "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
             "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json",
             "safety_checker/config.json", "safety_checker/model.safetensors", "safety_checker/pytorch_model.fp16.bin",
             "text_encoder/config.json", "text_encoder/pytorch_model.bin", "text_encoder/model.fp16.safetensors",
             "unet/config.json", *(f"unet/{w}" for w in weights), "unet/diffusion_pytorch_model.non_ema.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.bin",
             "onnx/unet/model.onnx"]
    index = {"_class_name": "StableDiffusionPipeline", "feature_extractor": ["transformers", "CLIPImageProcessor"],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "requires_safety_checker": True,
             **{name: ["x", "y"] for name in ("scheduler", "tokenizer", "text_encoder", "unet", "vae")}}
    chosen = set(hub_files_to_fetch(files, index))
    assert chosen == {
        "model_index.json", "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
        "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json",
        "safety_checker/config.json", "safety_checker/model.safetensors",
        "text_encoder/config.json", "text_encoder/pytorch_model.bin",  # plain .bin beats an fp16 copy
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",  # only fp16 there
    }
    index["safety_checker"] = index["feature_extractor"] = [None, None]
    assert not any(f.startswith(("safety_checker/", "feature_extractor/")) for f in hub_files_to_fetch(files, index))


@pytest.mark.e2e  # 2 GB of checkpoint, 4 GB of converted folder: make test-e2e
def test_a_single_file_sd15_checkpoint_of_the_real_shapes_converts_offline(tmp_path):
    """What an A1111/Civitai user has: one .safetensors in the original (CompVis ldm) layout, SD 1.5's
    shapes, no diffusers folder and no internet. fetch_model, as the rule runs it, converts it with
    diffusers' from_single_file and the project's SD 1.5 configs and tokenizer (workflow/single_file.py):
    every weight lands where it belongs (spot-checked in each component), and the tokenizer gives
    CLIP's ids. Bugs caught: a config that does not match the released shapes (from_single_file
    refuses or leaves weights at their initial values), a tokenizer vocabulary in the wrong order, a
    conversion that reaches for the Hub (HF_HUB_OFFLINE makes that an error)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from workflow.families import FAMILIES, UNET_PREFIX, VAE_PREFIX, family_of
    from workflow.models import load_tokenizer
    from workflow.original_layout import clip_to_original, convert, unet_rows, vae_rows
    from workflow.single_file import write_family_config

    released = write_family_config(tmp_path / "released", FAMILIES["sd1"], 512, "epsilon")
    with torch.device("meta"):  # the released shapes, through the export's key tables
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(released / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(released / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(released / "text_encoder"))
    shapes = convert(unet.state_dict(), unet_rows(dict(unet.config)), UNET_PREFIX, "unet")
    shapes |= convert(vae.state_dict(), vae_rows(dict(vae.config)), VAE_PREFIX, "vae")
    shapes |= clip_to_original(text.state_dict(), FAMILIES["sd1"].text_encoders[0].prefix)
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(v.shape, generator=gen) * 0.02).half() for k, v in shapes.items()}
    checkpoint = tmp_path / "v1-5-pruned-emaonly.safetensors"
    save_file(tensors, checkpoint)
    assert sum(t.numel() for t in tensors.values()) > 1.0e9  # SD 1.5's UNet + VAE + CLIP-L

    cfg = tiny_config(f"model.pretrained={checkpoint}")
    run_stage("fetch_model", cfg, "--out", str(tmp_path / "model"), timeout=1200)
    model = tmp_path / "model"
    assert family_of(model).name == "sd1" and json.loads((model / "fetch.json").read_text())["configs"].startswith(
        "the project's sd1 configs")
    got_unet, got_vae = load_denoiser(model), load_vae(model)
    got_text = load_text_encoder(model)
    for ours, key in ((got_unet.conv_in.weight, "model.diffusion_model.input_blocks.0.0.weight"),
                      (got_unet.up_blocks[3].attentions[2].transformer_blocks[0].attn2.to_k.weight,
                       "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"),
                      (got_vae.decoder.conv_out.weight, "first_stage_model.decoder.conv_out.weight"),
                      (got_text.embeddings.token_embedding.weight,
                       "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")):
        torch.testing.assert_close(ours, tensors[key].float())
    assert load_tokenizer(model)("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
