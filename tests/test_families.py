"""SD 2.x- and SDXL-shaped models through every stage (builtin:tiny-sd2, builtin:tiny-xl), checked
against what diffusers itself computes and loads: its SDXL pipeline's prompt encoding, its
from_pretrained / AutoPipeline / from_single_file / load_lora_weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from workflow.families import BUILTIN_RESOLUTIONS, family_of
from workflow.latents import LatentStream

from conftest import built_with, run_stage, shared_once, tiny_config


def xl_config(*extra: str):
    return tiny_config("model.pretrained=builtin:tiny-xl", *extra)


@pytest.fixture(scope="session")
def xl_built(built, tmp_path_factory) -> dict[str, Path]:
    """builtin:tiny-xl fetched and cached on the shared prepared digits."""
    return built_with(xl_config(), built, tmp_path_factory, "xl-built")


def run_through(xl_built, run_dir: Path, *overrides: str, sample: bool = True) -> None:
    """train (2 ranks) -> ema -> sample -> export, as the rules call them."""
    cfg = xl_config(*overrides)
    model, latents = str(xl_built["model"]), str(xl_built["latents"])
    run_stage("train", cfg, "--latents", latents, "--model", model, "--data", str(xl_built["data"]),
              "--run-dir", str(run_dir))
    run_stage("ema", cfg, "--model", model, "--run-dir", str(run_dir), "--out", str(run_dir / "model"))
    if sample:
        run_stage("sample", cfg, "--model", str(run_dir / "model"), "--base-model", model, "--latents", latents,
                  "--run-dir", str(run_dir), "--out", str(run_dir / "samples"))
    run_stage("export", cfg, "--model", str(run_dir / "model"), "--base-model", model, "--run-dir", str(run_dir),
              "--data", str(xl_built["data"]), "--out", str(run_dir / "export"))


@pytest.fixture(scope="session")
def xl_runs(xl_built, tmp_path_factory) -> dict[str, Path]:
    """A full ZeRO-3 run and a LoRA ZeRO-2 run (fused model too), 2 ranks each, through every stage
    (the LoRA run's fused folder samples as the full run's does: its sample stage is left out)."""
    def build(root: Path) -> None:
        run_through(xl_built, root / "full-z3", "train.zero_stage=3", "sample.compare_base=true")
        run_through(xl_built, root / "lora-z2", "train.mode=lora", "train.zero_stage=2", "train.lr=5e-2",
                    "ema.use=false", "ema.fuse_lora=true", sample=False)

    root = shared_once(tmp_path_factory, "xl-runs", build)
    return {"full": root / "full-z3", "lora": root / "lora-z2"}


def test_tiny_xl_is_an_sdxl_folder(xl_built):
    """The family is read from the folder (bug caught: an SDXL folder treated as SD 1.x, one encoder)."""
    from diffusers import StableDiffusionXLPipeline

    assert family_of(xl_built["model"]).name == "sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_built["model"])
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == (pipe.text_encoder.config.hidden_size
                                                    + pipe.text_encoder_2.config.hidden_size)
    assert pipe.config.force_zeros_for_empty_prompt


def test_sdxl_cache_holds_what_diffusers_encodes(xl_built):
    """The cached conditioning equals StableDiffusionXLPipeline.encode_prompt's (bugs caught: the last
    instead of the penultimate layer, the encoders concatenated in the wrong order, the first
    encoder's pooled output, a null caption that is not the zeros SDXL samples with) and the size
    conditions are the image's (original size, crop corner, target size)."""
    from diffusers import StableDiffusionXLPipeline

    from workflow.imaging import decode_image
    from workflow.latents import decode_latent_sample
    from workflow.shards import iter_shard

    manifest = json.loads((xl_built["latents"] / "manifest.json").read_text())
    assert manifest["family"] == "sdxl" and manifest["text_shape"] == [16, 80] and manifest["pooled_shape"] == [32]
    assert manifest["native_resolution"] == 32  # UNet sample size 8 x the tiny VAE's 4
    # cache.resolution auto took the folder's own, which the cache folder's name promised beforehand
    assert manifest["resolution"] == BUILTIN_RESOLUTIONS["builtin:tiny-xl"] == 32
    assert {"text_encoder_2", "tokenizer_2"} <= set(manifest["fingerprint"])
    first_shard = manifest["shards"][0]["name"]
    stored = next(iter_shard(xl_built["latents"] / first_shard))
    cached = decode_latent_sample(stored)
    raw = next(s for s in iter_shard(xl_built["data"] / first_shard) if s["__key__"] == stored["__key__"])
    stream = LatentStream(xl_built["latents"], seed=0)

    pipe = StableDiffusionXLPipeline.from_pretrained(xl_built["model"])
    caption = cached["meta"]["captions"][0]
    text, negative, pooled, negative_pooled = pipe.encode_prompt(caption, do_classifier_free_guidance=True)
    torch.testing.assert_close(cached["text"][0].float(), text[0], atol=2e-3, rtol=2e-3)  # stored in fp16
    torch.testing.assert_close(cached["pooled"][0].float(), pooled[0], atol=2e-3, rtol=2e-3)
    assert negative.abs().max() == 0 and negative_pooled.abs().max() == 0
    assert stream.null_text.abs().max() == 0 and stream.null_pooled.abs().max() == 0
    assert stream.null_text.shape == text[0].shape and stream.null_pooled.shape == pooled[0].shape

    w, h = decode_image(raw).size
    assert w == h  # the digits are square: the center crop starts at the corner
    assert cached["size"].tolist() == [[h, w, 0, 0, 32, 32]]


def test_sdxl_caption_dropout_drops_both_embeddings_and_keeps_sizes(xl_built):
    """A dropped caption zeroes the hidden states and the pooled embedding together; time_ids stay
    (bug caught: pooled embeddings left in place, so the unconditional model never sees zeros)."""
    from types import SimpleNamespace

    from workflow.families import FAMILIES
    from workflow.train import diffusion_loss

    stream = LatentStream(xl_built["latents"], seed=0)
    batch = next(stream.batches(0, micro_batch=8))
    batch.pop("position")
    seen = {}

    def model(noisy, timesteps, encoder_hidden_states, added_cond_kwargs):
        seen.update(text=encoder_hidden_states, **added_cond_kwargs)
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    def run(dropout: float) -> dict:
        cfg = xl_config(f"train.caption_dropout={dropout}")
        diffusion_loss(model, FAMILIES["sdxl"].objective(xl_built["model"], "v_prediction"), batch,
                       (stream.null_text, stream.null_pooled), cfg, (1.0, 0.0), FAMILIES["sdxl"],
                       torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32)
        return dict(seen)

    kept, dropped = run(0.0), run(1.0)
    assert kept["text_embeds"].abs().amax(dim=1).gt(0).all() and kept["text"].abs().amax(dim=(1, 2)).gt(0).all()
    assert dropped["text_embeds"].abs().max() == 0 and dropped["text"].abs().max() == 0
    torch.testing.assert_close(kept["time_ids"], batch["size"][:, 0].float())
    torch.testing.assert_close(dropped["time_ids"], kept["time_ids"])


def test_sdxl_runs_merge_into_folders_diffusers_loads(xl_built, xl_runs, tmp_path):
    """2-rank ZeRO-3 full and ZeRO-2 LoRA runs: merged folders that StableDiffusionXLPipeline and
    AutoPipelineForText2Image load with the trained weights (bug caught: the merge writing an SD 1.x
    pipeline without text_encoder_2, or the base UNet), a LoRA file load_lora_weights applies, the
    single-file export that from_single_file reads back, and the sample stage's metrics."""
    from diffusers import AutoPipelineForText2Image, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(xl_built["model"])
    base_unet = base.unet.state_dict()
    for name in ("full", "lora"):
        run = xl_runs[name]
        merged = StableDiffusionXLPipeline.from_pretrained(run / "model")
        assert type(AutoPipelineForText2Image.from_pretrained(run / "model")).__name__ == "StableDiffusionXLPipeline"
        changed = [k for k, v in merged.unet.state_dict().items() if not torch.equal(v, base_unet[k])]
        assert any(k.startswith("add_embedding.") for k in changed) or name == "lora"  # the added conditions train
        assert len(changed) > 10, name

    samples = xl_runs["full"] / "samples"
    metrics = json.loads((samples / "metrics.json").read_text())
    assert metrics["images"] == 4 and len(list(samples.glob("p*.png"))) == 4
    assert np.isfinite(metrics["val_loss"]) and metrics["val_samples"] == 64
    assert metrics["base"]["val_loss"] != metrics["val_loss"]  # the merged UNet is the one validated

    # The LoRA file on the base pipeline changes what it generates, and equals the fused model.
    def generate(pipe):
        return pipe("a handwritten digit 3", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    before = generate(base)
    base.load_lora_weights(xl_runs["lora"] / "model", weight_name="pytorch_lora_weights.safetensors")
    with_lora = generate(base)
    fused = generate(StableDiffusionXLPipeline.from_pretrained(xl_runs["lora"] / "model"))
    assert np.abs(with_lora - before).max() > 1e-3
    np.testing.assert_allclose(with_lora, fused, atol=2e-3)
    # A LoRA-only merge (ema.fuse_lora: false): the sample stage's loader puts the file on the SDXL base
    # (bug caught: an SD 1.x pipeline, or the base without the adapter, sampling for it).
    from workflow.sample import LORA_FILE, load_pipeline as sample_pipeline

    lora_only = tmp_path / "lora-only"
    lora_only.mkdir()
    for name in (LORA_FILE, "merge.json"):
        shutil.copy(xl_runs["lora"] / "model" / name, lora_only / name)
    staged = sample_pipeline(lora_only, torch.device("cpu"), xl_built["model"])
    assert type(staged).__name__ == "StableDiffusionXLPipeline"
    np.testing.assert_allclose(generate(staged), fused, atol=2e-3)

    # The single file (sgm layout) read back by diffusers' own SDXL single-file loader.
    (file,) = (xl_runs["full"] / "export").glob("*.safetensors")  # <run>.safetensors
    single = StableDiffusionXLPipeline.from_single_file(str(file), config=str(xl_built["model"]),
                                                        torch_dtype=torch.float32)
    merged = StableDiffusionXLPipeline.from_pretrained(xl_runs["full"] / "model")
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(merged, component).state_dict(), getattr(single, component).state_dict()
        assert set(ours) == set(theirs), component
        for key, value in ours.items():
            torch.testing.assert_close(theirs[key].float(), value.float(), atol=1e-3, rtol=1e-3)  # fp16 file
    kohya = json.loads((xl_runs["lora"] / "export" / "export.json").read_text())["files"]
    assert kohya["digits-tiny-xl_lora.safetensors"]["architecture"] == "stable-diffusion-xl-v1-base/lora"  # run auto


def test_tiny_sd2_trains_merges_and_samples(small, tmp_path):
    """builtin:tiny-sd2 (OpenCLIP-like gelu encoder, v-prediction from its scheduler) through every
    stage (bug caught: the family's prediction type not reaching the merged scheduler), on the small
    data set (3 images; 21 with its prior images: a quick cache)."""
    from diffusers import StableDiffusionPipeline

    built = small
    cfg = tiny_config(*small["overrides"], "model.pretrained=builtin:tiny-sd2", "train.steps=2",
                      "train.checkpoint_every=2", "train.procs=1", "train.val_samples=1")
    model, latents, run = tmp_path / "model", tmp_path / "latents", tmp_path / "run"
    run_stage("fetch_model", cfg, "--data", str(built["data"]), "--out", str(model))
    assert family_of(model).name == "sd2"
    run_stage("cache", cfg, "--data", str(built["data"]), "--model", str(model), "--out", str(latents))
    run_stage("train", cfg, "--latents", str(latents), "--model", str(model), "--data", str(built["data"]),
              "--run-dir", str(run))
    run_stage("ema", cfg, "--model", str(model), "--run-dir", str(run), "--out", str(run / "model"))
    run_stage("sample", cfg, "--model", str(run / "model"), "--base-model", str(model), "--latents", str(latents),
              "--out", str(run / "samples"))
    assert json.loads((run / "train.json").read_text())["prediction_type"] == "v_prediction"
    merged = StableDiffusionPipeline.from_pretrained(run / "model")
    assert merged.scheduler.config.prediction_type == "v_prediction"
    assert merged.text_encoder.config.hidden_act == "gelu"
    assert np.isfinite(json.loads((run / "samples" / "metrics.json").read_text())["val_loss"])


def test_model_vae_override_is_linked_and_checked(xl_built, tmp_path):
    """model.vae replaces the model's VAE for every stage (a link), and a VAE whose latent scaling
    differs is refused naming the key (bug caught: an SD 1.x VAE silently used with SDXL)."""
    from workflow.fetch_model import replace_vae

    model = tmp_path / "model"
    shutil.copytree(xl_built["model"], model)
    fixed = tmp_path / "fp16-fix-vae"
    shutil.copytree(xl_built["model"] / "vae", fixed)
    other = tmp_path / "sd15-vae"
    shutil.copytree(fixed, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"scaling_factor": 0.18215}))
    with pytest.raises(ValueError, match="scaling_factor 0.18215"):
        replace_vae(model, other)
    replace_vae(model, fixed)
    assert (model / "vae").resolve() == fixed.resolve()
    with pytest.raises(FileNotFoundError, match="not a diffusers VAE folder"):
        replace_vae(model, tmp_path / "nothing")
    assert tiny_config(f"model.vae={fixed}").model_name == "tiny-digits+fp16-fix-vae"


def test_non_finite_latents_stop_the_cache_naming_the_sample(built, tmp_path):
    """A NaN from the encoders (SDXL's VAE in fp16 overflows) is an error naming the sample, and the
    shard is not written (bug caught: a silently black model trained on NaN latents)."""
    from workflow.cache import LatentEncoder, NonFiniteLatents, cache_shard

    enc = LatentEncoder(built["model"], torch.device("cpu"))
    encode = enc.vae.encode

    def overflowing(x):
        out = encode(x)
        out.latent_dist.mean[1] = float("nan")  # the second sample of each batch
        return out

    enc.vae.encode = overflowing
    manifest = json.loads((built["data"] / "manifest.json").read_text())
    src = built["data"] / manifest["shards"][0]["name"]
    dest = tmp_path / "shard.tar"
    with pytest.raises(NonFiniteLatents, match=r"sample \d+ of .*non-finite mean"):
        cache_shard(enc, tiny_config(), src, dest)
    assert not dest.exists() and not list(tmp_path.iterdir())
