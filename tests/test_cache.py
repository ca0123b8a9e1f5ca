"""Caching at scale: processes, crash recovery, crop/flip policy, fingerprints."""

import json
import shutil

import numpy as np

from workflow.latents import LatentStream
from workflow.shards import iter_shard, npy_load

from conftest import run_stage, tiny_config


def cache_args(built, out):
    return ["--data", str(built["data"]), "--model", str(built["model"]), "--out", str(out)]


def shard_arrays(out):
    """Every stored array of every shard, by (shard, key, member)."""
    manifest = json.loads((out / "manifest.json").read_text())
    arrays = {}
    for shard in manifest["shards"]:
        for sample in iter_shard(out / shard["name"]):
            for member in ("mean.npy", "std.npy", "text.npy"):
                arrays[shard["name"], sample["__key__"], member] = npy_load(sample[member])
    return arrays


def assert_same_content(a, b, fp16_ulps: int = 0):
    """Same shards, keys and arrays; `fp16_ulps` allows that many fp16 roundings of difference."""
    x, y = shard_arrays(a), shard_arrays(b)
    assert x.keys() == y.keys()
    for k in x:
        if fp16_ulps:
            np.testing.assert_allclose(x[k], y[k], rtol=fp16_ulps * 2**-10, atol=fp16_ulps * 2**-14, err_msg=str(k))
        else:
            np.testing.assert_array_equal(x[k], y[k], err_msg=str(k))


def test_two_processes_give_the_same_shards(built, tmp_path):
    out = tmp_path / "two"
    run_stage("cache", tiny_config("cache.procs=2"), *cache_args(built, out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["procs"] == 2 and manifest["count"] == 1797
    # On the CPU a process with 1 thread may sum a convolution in another order than one with 2
    # threads, which can move a value across an fp16 rounding boundary: allow one such rounding.
    assert_same_content(built["latents"], out, fp16_ulps=1)


def test_random_crop_and_flip(built, tmp_path):
    out = tmp_path / "flip"
    run_stage("cache", tiny_config("cache.center_crop=false", "cache.random_flip=true"), *cache_args(built, out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["variants"] == 2 and manifest["fingerprint"]["flip"] == "True"
    sample = next(LatentStream(out, seed=0).samples_from(0))
    assert sample["mean"].shape == (2, 4, 8, 8)
    assert not np.array_equal(sample["mean"][0], sample["mean"][1])  # the flipped image differs


def test_changed_model_is_refused_by_train(built, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(built["model"], model)
    config = json.loads((model / "vae" / "config.json").read_text())
    config["scaling_factor"] *= 2
    (model / "vae" / "config.json").write_text(json.dumps(config))
    proc = run_stage("train", tiny_config(), "--latents", str(built["latents"]), "--model", str(model),
                     "--data", str(built["data"]), "--run-dir", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2
    assert "vae differ" in proc.stderr and "snakemake --forcerun cache" in proc.stderr
