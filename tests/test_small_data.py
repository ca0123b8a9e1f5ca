"""Small data sets and DreamBooth-style data: data.caption, prior (class) images mixed into every
micro-batch, a data set smaller than a micro-batch, and resuming all of it exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from workflow.config import ConfigError
from workflow.latents import LatentStream, PriorPart

from conftest import tiny_config, train
from test_train import check_killed_run_resumes_bitwise


def test_data_caption_captions_uncaptioned_images_or_wraps_each_caption(small, tmp_path):
    """Bugs caught: uncaptioned images skipped (DreamBooth data has none) or data.caption replacing
    the captions images have; the prior images losing theirs; a template without a caption to put in
    silently producing the bare template."""
    from workflow.prepare import prepare
    from workflow.shards import iter_shard

    def captions(folder: Path) -> list[list[str]]:
        manifest = json.loads((folder / "manifest.json").read_text())
        return [json.loads(s["json"])["captions"] for shard in manifest["shards"] for s in iter_shard(folder / shard["name"])]

    assert captions(small["data"]) == [["a photo of sks"]] * 3
    prior = captions(small["data"] / "prior")
    assert len(prior) == 18 and prior[0] == ["a handwritten digit 0"] and ["a handwritten digit 7"] not in prior
    manifest = json.loads((small["data"] / "manifest.json").read_text())
    assert manifest["prior"]["count"] == 18 and manifest["count"] == 3
    assert tiny_config(*small["overrides"]).dataset_name == "sevens+prior-others"

    template = tiny_config(f"data.source=imagefolder:{small['root'] / 'others'}", "data.caption=sks style, {caption}")
    out = prepare(template, tmp_path / "wrapped")
    assert out["count"] == 18 and captions(tmp_path / "wrapped")[0] == ["sks style, a handwritten digit 0"]
    bare = tiny_config(f"data.source=imagefolder:{small['root'] / 'sevens'}", "data.caption=sks style, {caption}")
    with pytest.raises(ValueError, match="no usable images"):
        prepare(bare, tmp_path / "bare")
    assert not (tmp_path / "bare").exists()
    with pytest.raises(ConfigError, match="data.prior with cache.buckets"):
        tiny_config(*small["overrides"], "cache.buckets=auto")
    with pytest.raises(ConfigError, match="data.prior needs train.micro_batch >= 2"):
        tiny_config(*small["overrides"], "train.micro_batch=1")


def test_every_micro_batch_mixes_prior_images_in_a_fixed_share(small):
    """Bugs caught: prior samples missing from some micro-batches or in another share, their loss
    weight on the wrong samples, a data set smaller than the micro-batch giving short batches, and
    an order that is not a function of (seed, position)."""
    cfg = tiny_config(*small["overrides"])
    k = cfg.data.prior.per_micro_batch(cfg.train.micro_batch)
    assert k == 2
    for rank in (0, 1):
        stream = LatentStream(small["latents"], 0, 2, rank)
        prior = LatentStream(small["latents"] / "prior", 0, 2, rank)
        assert stream.per_rank == 1 and prior.per_rank == 9  # 3 images on 2 ranks: one each, one sits out
        batches = stream.batches(0, 2, prior=PriorPart(prior, 0, k, 0.5))
        first = [next(batches) for _ in range(5)]
        for b in first:
            assert b["mean"].shape[0] == 4
            assert b["loss_weight"].tolist() == [1.0, 1.0, 0.5, 0.5]
        assert [b["position"] for b in first] == [2, 4, 6, 8, 10]  # 2 epochs of 1 image per micro-batch
        assert [b["prior_position"] for b in first] == [2, 4, 6, 8, 10]
        assert stream.epochs_done(10) == 10.0
        # resumed at micro-batch 3 from the positions it saved: the same samples follow
        again = stream.batches(first[2]["position"], 2, prior=PriorPart(prior, first[2]["prior_position"], k, 0.5))
        for want in first[3:]:
            got = next(again)
            assert torch.equal(got["mean"], want["mean"]) and torch.equal(got["texts"], want["texts"])


def test_three_images_with_prior_train_on_two_ranks_and_resume_bitwise(small, tmp_path):
    """The issue's small case: 3 images, micro-batch 4, 2 ranks (with prior images). Bugs caught: a
    resume that restores the data position but not the prior stream's (the weights then differ), a
    rerun that silently starts afresh (resumed_from 0), the epoch count missing from the log."""
    overrides = small["overrides"]
    straight = tmp_path / "straight"
    train(small, straight, *overrides, latents=small["latents"])
    result = json.loads((straight / "train.json").read_text())
    assert result["prior_per_micro_batch"] == 2 and result["global_batch"] == 8
    assert result["epochs"] == 12.0  # 2 of a rank's 1-image epochs per micro-batch, 6 steps
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["step"] in (2, 6)] == [4.0, 12.0]
    assert np.isfinite(result["final_loss"])

    kill_at = random.Random("small").randint(3, 5)  # after the step-2 checkpoint is complete
    check_killed_run_resumes_bitwise(small, straight, tmp_path / "killed", overrides, kill_at, small["latents"])


def test_generated_prior_images_come_from_the_base_model_and_feed_the_cache(built, tmp_path):
    """data.prior.source generate (DreamBooth's class images): the prior_images stage samples
    data.prior.count images of data.prior.caption from the base model, each from its own seed (the
    same seed gives the same image: the folder is reusable), written as a prepared data set that the
    cache stage encodes into prior/. Bugs caught: images of the wrong caption or count, a
    non-reproducible set (a rerun would recache), and the cache ignoring --prior."""
    from PIL import Image

    from conftest import run_stage
    from workflow.shards import iter_shard

    overrides = ["data.prior.source=generate", "data.prior.caption=a handwritten digit 7", "data.prior.count=3",
                 "data.prior.seed=5", "sample.steps=4"]
    cfg = tiny_config(*overrides)
    assert cfg.prepared_name == "digits" and cfg.dataset_name.startswith("digits+prior-generated-")
    run_stage("prior_images", cfg, "--model", str(built["model"]), "--out", str(tmp_path / "prior"))
    manifest = json.loads((tmp_path / "prior" / "manifest.json").read_text())
    assert (manifest["count"], manifest["source"], manifest["generated"]["caption"]) == (3, "generate",
                                                                                         "a handwritten digit 7")
    samples = [s for shard in manifest["shards"] for s in iter_shard(tmp_path / "prior" / shard["name"])]
    assert [json.loads(s["json"]) for s in samples] == [{"captions": ["a handwritten digit 7"], "seed": 5 + i}
                                                        for i in range(3)]
    import io

    images = [np.asarray(Image.open(io.BytesIO(s["png"]))) for s in samples]
    assert images[0].shape == (32, 32, 3) and not np.array_equal(images[0], images[1])  # one seed each
    again = tiny_config(*overrides[:3], "data.prior.count=1", "data.prior.seed=5", "sample.steps=4")
    run_stage("prior_images", again, "--model", str(built["model"]), "--out", str(tmp_path / "one"))
    (first,) = [s for shard in json.loads((tmp_path / "one" / "manifest.json").read_text())["shards"]
                for s in iter_shard(tmp_path / "one" / shard["name"])]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first["png"]))), images[0])  # seed 5 again

    # the cache stage encodes them beside the data set (a shard of the digits is enough here)
    sevens = tmp_path / "sevens"
    from conftest import write_digits

    write_digits(sevens, [7, 7], captions=False)
    data_cfg = tiny_config(*overrides, f"data.source=imagefolder:{sevens}", "data.caption=a photo of sks")
    run_stage("prepare", data_cfg, "--out", str(tmp_path / "data"))
    run_stage("cache", data_cfg, "--data", str(tmp_path / "data"), "--model", str(built["model"]), "--out",
              str(tmp_path / "latents"), "--prior", str(tmp_path / "prior"))
    latents = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert latents["count"] == 2 and latents["prior"]["count"] == 3
    assert json.loads((tmp_path / "latents" / "prior" / "manifest.json").read_text())["count"] == 3
