"""Aspect-ratio buckets: the sizes, the cache that sorts images into them, the training stream that
draws one-bucket micro-batches of exactly train.micro_batch, and resuming it exactly."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from workflow.buckets import auto_buckets, nearest_bucket, resolve_buckets
from workflow.config import ConfigError, load_config
from workflow.latents import LatentStream, validation_samples

from conftest import BUCKETS, LORA_RUN, REPO, run_stage, tiny_config, train
from test_train import check_killed_run_resumes_bitwise


def test_auto_buckets_cover_the_area_on_the_step_grid():
    """Bugs caught: sides off the latent grid (the UNet cannot take them), areas above resolution²
    (more memory than the square run), aspect ratios past max_aspect, one orientation only."""
    assert auto_buckets(32, 8, 2.0) == [(40, 24), (32, 32), (24, 40)]
    sd15 = auto_buckets(512, 64, 2.0)
    assert sd15 == [(640, 384), (576, 448), (512, 512), (448, 576), (384, 640)]
    for w, h in auto_buckets(1024, 32, 2.0):
        assert w % 32 == 0 and h % 32 == 0 and w * h <= 1024**2 and max(w / h, h / w) <= 2.0
        assert (h, w) in auto_buckets(1024, 32, 2.0)
    assert nearest_bucket(80, 48, auto_buckets(32, 8, 2.0)) == 0
    assert nearest_bucket(48, 80, auto_buckets(32, 8, 2.0)) == 2
    assert nearest_bucket(64, 60, auto_buckets(32, 8, 2.0)) == 1


def test_bucket_settings_are_checked(built):
    with pytest.raises(ValueError, match="36x24 not multiples of 8"):
        resolve_buckets(["40x24", "36x24"], 32, 2.0, built["model"])
    with pytest.raises(ConfigError, match="cache.buckets"):
        load_config(REPO / "config.yaml", ["cache.buckets=['40by24']"])
    with pytest.raises(ConfigError, match="sample.resolution"):
        load_config(REPO / "config.yaml", ["sample.resolution=['40x']"])
    # Each bucket setting has its own latent cache folder (so one never overwrites another's).
    keys = {tiny_config(*o).encoder_key for o in ([], ["cache.buckets=auto"], ["cache.buckets=['40x24','24x40']"],
                                                  ["cache.buckets=auto", "cache.max_aspect=1.5"])}
    assert len(keys) == 4
    assert tiny_config("sample.resolution=['40x24', 32]").sample.sizes(32) == [(40, 24), (32, 32)]


def test_cache_sorts_images_into_buckets_with_their_sizes(bucketed):
    """Wide images go to the wide bucket and tall to the tall one, each stored at its bucket's
    latent size with SDXL's size conditions (bug caught: square crops of non-square images, or a
    manifest whose counts do not match the shards)."""
    from workflow.latents import decode_latent_sample
    from workflow.shards import iter_shard

    manifest = json.loads((bucketed["latents"] / "manifest.json").read_text())
    assert [(b["size"], b["count"]) for b in manifest["buckets"]] == [([40, 24], 899), ([32, 32], 0), ([24, 40], 898)]
    assert manifest["latent_shape"] is None and manifest["fingerprint"]["buckets"] == "40x24,32x32,24x40"
    for shard in manifest["shards"]:
        stored = list(iter_shard(bucketed["latents"] / shard["name"]))
        assert len(stored) == len(shard["bucket_of"]) == shard["count"]
        for raw, bucket in zip(stored, shard["bucket_of"]):
            sample = decode_latent_sample(raw)
            w, h = manifest["buckets"][bucket]["size"]
            assert sample["mean"].shape == (1, 4, h // 4, w // 4)
            ow, oh = (int(x) for x in sample["meta"]["size"].split("x"))  # the image as prepared
            scale = max(w / ow, h / oh)  # resized to cover the bucket, then center-cropped
            top, left = (round(oh * scale) - h) // 2, (round(ow * scale) - w) // 2
            assert sample["size"].tolist() == [[oh, ow, top, left, h, w]]
            assert (w > h) == (ow > oh) and top + left == 1  # 72x48 -> 40x27 -> 40x24


def test_bucketed_stream_batches_are_full_disjoint_and_a_function_of_seed_and_epoch(bucketed):
    """Every micro-batch is one bucket with exactly micro_batch samples; the two ranks never share a
    sample within an epoch; the remainder is counted; the order depends on (seed, epoch) only and a
    stream started at any position continues exactly as the uninterrupted one (bug caught: a
    resumed stream that restarts its open batches and draws other samples than an uninterrupted run)."""
    mb = 8

    def stream(rank: int, seed: int = 0) -> LatentStream:
        return LatentStream(bucketed["latents"], seed, world_size=2, rank=rank, val_samples=64, micro_batch=mb)

    ranks = [stream(0), stream(1)]
    assert all(s.bucketed for s in ranks)
    per_epoch = []
    for s in ranks:
        plan, left_out = s.plan(0)
        assert len(plan) * mb + left_out == s.per_rank and left_out < 2 * mb  # < mb in each of the two buckets
        for batch in plan:
            assert len(batch) == mb and len({s.shards[sh]["bucket_of"][i] for sh, i in batch}) == 1
        per_epoch.append({key for batch in plan for key in batch})
    assert not per_epoch[0] & per_epoch[1]
    assert ranks[0].plan(0) == stream(0).plan(0) and ranks[0].plan(1) != ranks[0].plan(0)
    assert stream(0, seed=1).plan(0) != ranks[0].plan(0)

    def take(s: LatentStream, position: int, n: int) -> list[dict]:
        it = s.batches(position, mb)
        return [next(it) for _ in range(n)]

    straight = take(stream(0), 0, len(ranks[0].plan(0)[0]) + 6)  # into the second epoch
    for at in (5, len(ranks[0].plan(0)[0]) + 2):
        resumed = take(stream(0), straight[at - 1]["position"], len(straight) - at)
        for a, b in zip(straight[at:], resumed):
            assert a["position"] == b["position"]
            assert torch.equal(a["mean"], b["mean"]) and torch.equal(a["texts"], b["texts"])
    shapes = {tuple(b["mean"].shape[-2:]) for b in straight}
    assert shapes == {(6, 10), (10, 6)}  # both buckets are drawn
    # A micro-batch no bucket can fill is an error naming it, not an endless search or a short batch.
    with pytest.raises(ValueError, match=r"full micro-batch of 500 .*'40x24': 4\d\d"):
        LatentStream(bucketed["latents"], 0, world_size=2, rank=0, val_samples=64, micro_batch=500).plan(0)


def test_killed_and_resumed_bucketed_run_is_bitwise_identical(bucketed, tmp_path):
    """make test's kill-and-resume check (LoRA with adapter dropout, ZeRO-2, 2 ranks, buckets; full
    fine-tuning without buckets is killed five times in the fault suite, make test-faults). Bugs
    caught: a resume that restores weights but not the optimizer, EMA, RNG (adapter dropout) or data
    position, or a position that does not restore the bucket plan (the weights then differ from
    the uninterrupted run's); and, since training is deterministic, a rerun that silently starts
    afresh (resumed_from is 0)."""
    overrides = [*BUCKETS, *LORA_RUN]
    straight = tmp_path / "straight"
    train(bucketed, straight, *overrides, latents=bucketed["latents"])
    result = json.loads((straight / "train.json").read_text())
    assert result["bucketed"]
    assert result["bucket_left_out_per_epoch"]["0"] == sum(
        LatentStream(bucketed["latents"], 0, 2, r, 64, micro_batch=8).left_out(0) for r in (0, 1))

    kill_at = random.Random("buckets").randint(4, 7)  # after the step-3 checkpoint is complete
    check_killed_run_resumes_bitwise(bucketed, straight, tmp_path / "killed", overrides, kill_at, bucketed["latents"])


def test_bucketed_validation_and_samples_at_several_sizes(bucketed, tmp_path):
    """The sample stage on a bucketed cache: validation loss over held-out samples of both buckets
    (bug caught: stacking latents of different sizes), images at each sample.resolution size,
    scored per size, in one grid."""
    from PIL import Image

    cfg = tiny_config(*BUCKETS, "sample.resolution=['40x24', '24x40']", "sample.seeds=[0]")
    out = tmp_path / "samples"
    run_stage("sample", cfg, "--model", str(bucketed["model"]), "--base-model", str(bucketed["model"]), "--latents",
              str(bucketed["latents"]), "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sizes"] == ["40x24", "24x40"] and metrics["images"] == 4 and np.isfinite(metrics["val_loss"])
    assert set(metrics["digit_accuracy_per_size"]) == {"40x24", "24x40"}
    sizes = sorted(Image.open(p).size for p in out.glob("p*.png"))
    assert sizes == [(24, 40), (24, 40), (40, 24), (40, 24)]
    held_out = {tuple(s["mean"].shape) for s in validation_samples(bucketed["latents"], 64)}
    assert held_out == {(1, 4, 6, 10), (1, 4, 10, 6)}


@pytest.mark.parametrize("mode, graphs", [("per_bucket", 10), ("dynamic", 1)])
def test_compiled_forward_meets_every_bucket_shape_compiled(monkeypatch, mode, graphs):
    """Bug caught: per_bucket without Dynamo's recompile limit raised compiles 8 graphs and runs every
    later bucket shape eagerly, silently slow (torch only logs it); dynamic recompiling per shape.
    Dynamo's guards and limits are what is tested: the backend is its eager one (no Inductor on the CPU)."""
    import torch._dynamo
    import torch._dynamo.config as dynamo
    from torch._dynamo.utils import counters

    from workflow.engine import compile_forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    with dynamo.patch(recompile_limit=8, accumulated_recompile_limit=256):  # torch's defaults, restored after
        conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        compile_forward(conv, mode, shapes=10)
        # 10 bucket shapes, one square; no side equals the batch or channels (Dynamo would give them one symbol)
        for width in range(5, 15):
            conv(torch.randn(2, 3, 24 - width, width)).sum().backward()
        assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_compiled_graphs_land_in_the_configured_cache(monkeypatch, tmp_path):
    """train.compile_cache reaches Inductor: what it compiles is written there, where a rerun on this
    filesystem finds it (bug caught: the location set after Inductor has read it, so every run
    compiles afresh in /tmp). A matrix product, which Inductor hands to its extern kernel: no C++
    to build, seconds."""
    import torch._dynamo

    from workflow.engine import use_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    use_compile_cache(str(tmp_path / "cache"))
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: a @ b)
    a, b = torch.randn(16, 8), torch.randn(8, 4)
    assert torch.allclose(fn(a, b), a @ b)
    written = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert any("fxgraph" in p.parts for p in written), sorted(str(p.relative_to(tmp_path)) for p in written)[:20]
    torch._dynamo.reset()
