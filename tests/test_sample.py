"""The sample stage: schedulers, determinism, grids, base comparison, checkpoints, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_stage, tiny_config
from PIL import Image
from test_stages import digit_accuracy_of

from workflow.latents import LatentStream, held_out, validation_samples
from workflow.sample import MIN_CELL


@pytest.fixture
def trained(zero_runs) -> Path:
    """The shared 2-rank run: checkpoints 2 and 4 kept (keep_checkpoints 1; sample.checkpoints names
    2), merged."""
    return zero_runs[0]


def sample(built, run_dir: Path, out: Path, *overrides: str, check: bool = True):
    return run_stage("sample", tiny_config(*overrides), "--model", str(run_dir / "model"), "--base-model",
                     str(built["model"]), "--latents", str(built["latents"]), "--run-dir", str(run_dir),
                     "--out", str(out), check=check)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))




SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
                     "pndm": "PNDMScheduler"}


def test_each_scheduler_samples_deterministically(built, trained, tmp_path):
    """Every image is a function of its prompt and seed alone, for every scheduler. Bugs caught:
    noise drawn from a shared or global generator (the repeated prompt then gives another image in
    the same batch), results that depend on the batch size or batch neighbours (batch_size 1
    differs), a negative prompt that never reaches guidance, and a stage whose images are not
    reproducible: the stage, in its own process, gives bit for bit what `generate` gives here.
    One stage run (the config reaching it); the schedulers' properties on one loaded pipeline."""
    from workflow.sample import generate, load_pipeline, set_scheduler

    prompts = "sample.prompts=['a handwritten digit 3', 'a handwritten digit 7', 'a handwritten digit 3']"
    opts = ["sample.negative_prompt='a handwritten digit 8'", "sample.steps=3", prompts]
    stage_scheduler = "dpm++"
    sample(built, trained, tmp_path / "stage", f"sample.scheduler={stage_scheduler}", *opts)
    metrics = json.loads((tmp_path / "stage" / "metrics.json").read_text())
    assert metrics["images"] == 6 and metrics["negative_prompt"] == "a handwritten digit 8"
    assert metrics["scheduler"] == SCHEDULER_CLASSES[stage_scheduler]
    assert metrics["clip_score"] is None and "sample.clip_model" in metrics["clip_score_skipped"]

    cpu = torch.device("cpu")
    pipe = load_pipeline(trained / "model", cpu)
    model_scheduler = pipe.scheduler
    size = (32, 32)  # cache.resolution
    jobs = [(pi, seed, size) for pi in range(3) for seed in (0, 1)]
    for scheduler, name in SCHEDULER_CLASSES.items():
        pipe.scheduler = model_scheduler  # each built from the model's own schedule, as the stage does
        set_scheduler(pipe, scheduler)
        assert type(pipe.scheduler).__name__ == name
        cfg = tiny_config(f"sample.scheduler={scheduler}", *opts)
        batched = {job: np.asarray(im) for job, im in generate(pipe, cfg, jobs, cpu).items()}
        for seed in (0, 1):  # the repeated prompt, in one batch with the others
            assert np.array_equal(batched[0, seed, size], batched[2, seed, size]), scheduler
        assert not np.array_equal(batched[0, 0, size], batched[1, 0, size])
        assert not np.array_equal(batched[0, 0, size], batched[0, 1, size])
        one_by_one = generate(pipe, tiny_config(f"sample.scheduler={scheduler}", *opts, "sample.batch_size=1"), jobs, cpu)
        for job, image in one_by_one.items():
            # Another batch size: the same seeds and draws; batched kernels may round differently.
            diff = np.abs(np.asarray(image).astype(int) - batched[job].astype(int))
            assert diff.max() <= 2, (scheduler, job, diff.max())
        if scheduler == stage_scheduler:
            for (pi, seed, _), image in batched.items():
                assert np.array_equal(pixels(tmp_path / "stage" / f"p{pi:03d}_s{seed}.png"), image), (pi, seed)
        if scheduler == "ddim":  # the negative prompt reaches guidance
            plain = generate(pipe, tiny_config("sample.scheduler=ddim", *opts[1:]), jobs[:1], cpu)
            assert not np.array_equal(np.asarray(plain[jobs[0]]), batched[jobs[0]])


def tiny_clip(built, folder: Path) -> Path:
    """A tiny local CLIP model (random weights) saved as a user's downloaded one would be."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(built["model"] / "tokenizer")
    text = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_grids_base_comparison_checkpoints_and_metrics(built, trained, tmp_path):
    """One sample run with every extra on: base comparison, checkpoint grid, a local CLIP model."""
    from transformers import CLIPModel, CLIPProcessor

    clip = tiny_clip(built, tmp_path / "clip")
    out = tmp_path / "out"
    sample(built, trained, out, "sample.compare_base=true", "sample.checkpoints=[2, last]", "sample.resolution=24",
           f"sample.clip_model={clip}")
    cell = max(1, -(-MIN_CELL // 24)) * 24  # upscaled so small images can be seen
    grid = Image.open(out / "grid.png")
    assert grid.size == (200 + cell * 4, 20 + cell * 2)  # 2 prompts x (2 seeds fine-tuned + 2 base)
    assert Image.open(out / "p000_s0.png").size == (24, 24)
    assert len(list((out / "base").glob("p*_s*.png"))) == 4
    # label strip: dark text pixels above the columns and left of the rows
    strip = np.asarray(grid.convert("L"))
    assert strip[:20, 200:].min() < 128 and strip[20:, :200].min() < 128
    ckpt_grid = Image.open(out / "checkpoints.png")
    assert ckpt_grid.size == (200 + cell * 2, 20 + cell * 2)  # 2 checkpoints x 2 prompts

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_loss"] != metrics["base"]["val_loss"]  # measured on the fine-tuned model, not the base
    assert metrics["checkpoints"]["2"]["val_loss"] != metrics["val_loss"]
    assert set(metrics["checkpoints"]) == {"2", "4"}
    assert metrics["checkpoints"]["4"]["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)  # last = merged
    assert metrics["base"]["digit_images_scored"] == 4
    assert metrics["digit_images_scored"] == 4 and metrics["digit_accuracy"] == pytest.approx(digit_accuracy_of(out))
    assert set(metrics["digit_spread_per_prompt"]) == set(tiny_config().sample.prompts)  # 2 seeds a prompt: spread
    assert "digit_spread" in metrics["base"] and "digit_precision" in metrics  # 4 images > k = 3

    # CLIP score, recomputed through CLIPModel's forward: 100 x cosine(image, its own prompt), floored at 0.
    assert metrics["clip_model"] == str(clip)
    model, processor = CLIPModel.from_pretrained(clip), CLIPProcessor.from_pretrained(clip)
    prompts = tiny_config().sample.prompts
    pngs = sorted(out.glob("p*_s*.png"))
    inputs = processor(text=[prompts[int(p.name[1:4])] for p in pngs], images=[Image.open(p).convert("RGB") for p in pngs],
                       return_tensors="pt", padding=True)
    with torch.no_grad():  # CLIP's own forward: logits = exp(logit_scale) x cosine, each image vs each prompt
        logits = model(**inputs)
    expected = float((100 * logits.logits_per_image.diagonal() / model.logit_scale.exp()).clamp(min=0).mean())
    assert len(pngs) == 4 and metrics["clip_score"] == pytest.approx(expected, rel=1e-3, abs=1e-3)
    # CLIP's spread against the held-out real digits of each prompt's caption, for the run and the base
    assert metrics["clip_real_images"] > 0 and set(metrics["clip_spread_per_prompt"]) == set(prompts)
    assert "clip_spread" in metrics["base"] and metrics["base"]["clip_sample_spread"] != metrics["clip_sample_spread"]


def test_checkpoint_that_was_not_kept_is_a_clear_error(built, trained, tmp_path):
    # keep_checkpoints 1 kept step 4, and step 2 because sample.checkpoints listed it
    assert sorted(p.name for p in (trained / "checkpoints").glob("step*")) == ["step00000002", "step00000004"]
    proc = sample(built, trained, tmp_path / "bad", "sample.checkpoints=[3]", "train.checkpoint_every=1",
                  check=False)
    assert proc.returncode == 2 and "step00000003" in proc.stderr and "was not kept" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_held_out_samples_never_reach_training(built):
    manifest = json.loads((built["latents"] / "manifest.json").read_text())
    held = validation_samples(built["latents"], 64)
    assert len(held) == 64 and sum(map(len, held_out(manifest, 64))) == 64
    held_ids = {s["meta"]["source_id"] for s in held}
    for rank in range(2):
        stream = LatentStream(built["latents"], seed=0, world_size=2, rank=rank, val_samples=64)
        it = stream.samples_from(0)
        seen = {next(it)["meta"]["source_id"] for _ in range(stream.per_rank)}
        assert not seen & held_ids


def test_checkpoints_must_be_checkpoint_steps():
    from workflow.config import ConfigError

    with pytest.raises(ConfigError, match="sample.checkpoints"):
        tiny_config("sample.checkpoints=[3]")  # tiny: checkpoint_every 2


def test_validation_hold_out_adapts_to_the_data_set(built):
    """train.val_samples=auto never takes more than a small share and none of a handful of images,
    and the sample stage says why it has no validation loss (bugs caught: the old fixed 64 holding
    out 64 % of a 100-image set, or refusing a 24-image one; a null val_loss with no reason)."""
    from workflow.latents import resolve_val_samples
    from workflow.sample import Validator

    assert [resolve_val_samples("auto", n) for n in (3, 24, 99, 100, 500, 1797)] == [0, 0, 0, 5, 25, 64]
    assert resolve_val_samples(10, 24) == 10
    with pytest.raises(ValueError, match=r"train.val_samples \(64\) must be smaller than the 24 cached samples"):
        resolve_val_samples(64, 24)
    assert len(Validator(tiny_config(), built["latents"], built["model"], "v_prediction").samples) == 64  # auto
    none = Validator(tiny_config("train.val_samples=0"), built["latents"], built["model"], "v_prediction")
    assert none.samples == [] and "train.val_samples=0 for 1797 cached samples" in none.skipped


def real_digits(per_class: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    """`per_class` real digits of each class drawn at random (neighbours in sklearn's order are often
    one writer's), rendered as the data set renders them (32 px), with their prompts."""
    from sklearn.datasets import load_digits

    from workflow.sources import render_digit

    digits = load_digits()
    rng = np.random.default_rng(seed)
    images, prompts = [], []
    for d in range(10):
        for i in rng.choice(np.flatnonzero(digits.target == d), per_class, replace=False):
            images.append(render_digit(digits.data[i], 32))
            prompts.append(f"a handwritten digit {d}")
    return images, prompts


def test_spread_is_near_one_for_real_digits_and_falls_as_samples_collapse():
    """digit_spread / precision / recall (workflow/metrics.py) on real digits as if sampled, then with
    each prompt's images collapsing onto fewer distinct ones. Bugs caught: a spread that does not see
    one image repeated for every seed (digit_accuracy cannot: it scores 1.0 there), a recall that
    stays high when the variety is gone, a ratio against the wrong class's real spread."""
    from workflow.metrics import digit_spread

    images, prompts = real_digits(10, seed=1)
    real = digit_spread(images, prompts)
    assert 0.85 <= real["digit_spread"] <= 1.15 and real["digit_precision"] >= 0.8 and real["digit_recall"] >= 0.8, real
    previous = real
    for distinct in (5, 2, 1):  # each prompt's 10 images drawn from its first `distinct` ones
        collapsed = digit_spread([images[i - i % 10 + i % distinct] for i in range(len(images))], prompts)
        assert collapsed["digit_spread"] < previous["digit_spread"] and collapsed["digit_recall"] <= previous["digit_recall"]
        previous = collapsed
    assert previous["digit_spread"] == 0 and previous["digit_recall"] <= 0.2, previous
    # each prompt against its own class: the real 0s vary least (21.6 against 27.6-35.3), the 1s most,
    # and real digits of every class score about 1 (against all digits' spread the 0s would score 0.7)
    spreads = real["digit_real_spread_per_digit"]
    assert min(spreads, key=spreads.get) == "0" and max(spreads, key=spreads.get) == "1"
    assert all(0.8 <= v <= 1.25 for v in real["digit_spread_per_prompt"].values()), real["digit_spread_per_prompt"]


def test_clip_spread_is_near_one_for_real_images_and_falls_as_samples_collapse(built, tmp_path):
    """clip_spread / precision / recall (workflow/metrics.py), the measure for data other than the
    digits, in a CLIP model's image space: real digits sampled against other real digits of their
    caption score about 1, each prompt's images collapsing onto one score 0 with the recall down, and
    captions unique to one image give no per-prompt reference, said as such. Bugs caught: a spread
    that does not see a repeated image, references taken from other captions (a collapsed prompt
    would still score against the pooled variety), a ratio silently written where it has no reference."""
    from workflow.metrics import clip_spread

    clip = str(tiny_clip(built, tmp_path / "clip"))
    images, prompts = real_digits(8, seed=1)
    real, captions = real_digits(8, seed=2)
    cpu = torch.device("cpu")
    same = clip_spread(images, prompts, real, captions, clip, cpu)
    assert 0.8 <= same["clip_spread"] <= 1.25 and same["clip_precision"] >= 0.7 and same["clip_recall"] >= 0.7, same
    assert set(same["clip_spread_per_prompt"]) == set(prompts) and same["clip_real_images"] == 80
    collapsed = clip_spread([images[i - i % 8] for i in range(len(images))], prompts, real, captions, clip, cpu)
    assert collapsed["clip_spread"] == 0 and collapsed["clip_sample_spread"] == 0
    assert collapsed["clip_recall"] < same["clip_recall"] / 2, (collapsed, same)
    unique = clip_spread(images, prompts, real, [f"photo {i}" for i in range(len(real))], clip, cpu)
    assert unique["clip_spread"] is None and "no prompt has two or more real images" in unique["clip_spread_skipped"]
    assert unique["clip_sample_spread"] == pytest.approx(same["clip_sample_spread"]) and "clip_recall" not in unique
    assert clip_spread(images, prompts, real, captions, None, cpu)["clip_spread_skipped"] == "sample.clip_model is not set"
