"""Each stage on tiny data, called as the rules call it (python -m workflow.<stage>)."""

import json
import shutil

import numpy as np
import pytest
import torch

from workflow.latents import LatentStream

from conftest import merge, run_stage, tiny_config, train


def test_tiny_model_loads_through_from_pretrained(built):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(built["model"], safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # The tokenizer was learned on the captions but still encodes any text.
    ids = pipe.tokenizer("a handwritten digit 7, xyz!").input_ids
    assert pipe.tokenizer.unk_token_id not in ids[1:-1]
    assert json.loads((built["model"] / "fetch.json").read_text())["latent_std"] > 0


def test_local_model_folder_is_used_as_is(built, tmp_path):
    cfg = tiny_config(f"model.pretrained={built['model']}")
    out = tmp_path / "linked"
    run_stage("fetch_model", cfg, "--out", str(out))
    assert (out / "unet").resolve() == (built["model"] / "unet").resolve()


def test_model_folder_without_unet_is_refused(built, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(built["model"], broken)
    shutil.rmtree(broken / "unet")
    out = tmp_path / "out"
    proc = run_stage("fetch_model", tiny_config(f"model.pretrained={broken}"), "--out", str(out), check=False)
    assert proc.returncode == 2 and "missing unet/" in proc.stderr and str(broken) in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_cache_manifest_and_contents(built):
    manifest = json.loads((built["latents"] / "manifest.json").read_text())
    assert manifest["count"] == 1797 and len(manifest["shards"]) == 3
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["dtype"] == "fp16"
    assert set(manifest["fingerprint"]) >= {"vae", "text_encoder", "tokenizer", "resolution", "data_manifest", "all"}
    sample = next(LatentStream(built["latents"], seed=0).samples_from(0))
    assert sample["mean"].dtype == torch.float16 and sample["mean"].shape == (1, 4, 8, 8)  # (variants, C, H, W)
    assert sample["std"].min() > 0
    assert sample["text"].shape == (1, *manifest["text_shape"])
    assert np.load(built["latents"] / "null_text.npy").shape == tuple(manifest["text_shape"])


def test_cache_rerun_reuses_finished_shards(built, tmp_path):
    out = tmp_path / "latents"
    shutil.copytree(built["latents"], out)
    (out / "manifest.json").unlink()
    (out / "shard-000001.tar").unlink()  # as if killed while writing the second shard
    run_stage("cache", tiny_config(), "--data", str(built["data"]), "--model", str(built["model"]), "--out", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reused_shards"] == 2
    original = json.loads((built["latents"] / "manifest.json").read_text())
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in original["shards"]]


def test_stream_is_deterministic(built):
    one = next(LatentStream(built["latents"], seed=3, world_size=2, rank=1).batches(40, micro_batch=4))
    again = next(LatentStream(built["latents"], seed=3, world_size=2, rank=1).batches(40, micro_batch=4))
    assert torch.equal(one["mean"], again["mean"]) and torch.equal(one["texts"], again["texts"])
    other_seed = next(LatentStream(built["latents"], seed=4, world_size=2, rank=1).batches(40, micro_batch=4))
    assert not torch.equal(one["mean"], other_seed["mean"])


def test_train_refuses_a_stale_cache(built, tmp_path):
    cfg = tiny_config("cache.resolution=16")
    proc = run_stage("train", cfg, "--latents", str(built["latents"]), "--model", str(built["model"]),
                     "--data", str(built["data"]), "--run-dir", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2 and "resolution" in proc.stderr and "differ" in proc.stderr
    assert not (tmp_path / "run" / "train.json").exists()


def digit_accuracy_of(folder) -> float:
    """The share of folder's p<prompt>_s<seed>.png that scikit-learn's digits classifier labels with
    the digit of its prompt (the tiny config's prompts: 3, 7), recomputed from the saved files."""
    from PIL import Image

    from workflow.metrics import digit_classifier

    pngs = sorted(folder.glob("p*_s*.png"))
    wanted = [(3, 7)[int(p.name[1:4])] for p in pngs]
    predicted = digit_classifier().predict([Image.open(p).convert("RGB") for p in pngs])
    return float(np.mean(predicted == np.array(wanted)))


@pytest.mark.parametrize("zero, precision", [(0, "fp32"), (2, "bf16"), (0, "bf16-mixed")])
def test_two_rank_deepspeed_train_merge_sample(built, zero_runs, tmp_path, zero, precision):
    """Train with 2 ranks, merge, sample: the chain a user runs, per precision. ZeRO-0 fp32 is the
    shared run (trained and merged once for the session)."""
    from diffusers import StableDiffusionPipeline

    overrides = [f"train.zero_stage={zero}", f"train.precision={precision}"]
    if (zero, precision) == (0, "fp32"):
        run_dir = zero_runs[0]
    else:
        run_dir = tmp_path / "run"
        train(built, run_dir, *overrides)
        merge(built, run_dir, *overrides)
    result = json.loads((run_dir / "train.json").read_text())
    assert result["world_size"] == 2 and result["final_step"] == 4 and result["global_batch"] == 16
    assert result["precision"] == precision and result["zero_stage"] == zero
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000004"
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)
    assert list((run_dir / "monitor").rglob("*.csv")), "DeepSpeed CSV monitor wrote nothing"
    # DeepSpeed's TensorBoard monitor: the logged losses, one event per step (README: Logs).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run_dir / "monitor" / "train").glob("events.out.tfevents*"))))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("Train/loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in log]

    pipe = StableDiffusionPipeline.from_pretrained(run_dir / "model", safety_checker=None, requires_safety_checker=False)
    assert (run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (run_dir / "model" / "unet_raw").is_dir()
    trained = pipe.unet.state_dict()["conv_in.weight"]
    base = StableDiffusionPipeline.from_pretrained(built["model"]).unet.state_dict()["conv_in.weight"]
    assert not torch.equal(trained, base)

    samples = tmp_path / "samples"
    run_stage("sample", tiny_config(*overrides), "--model", str(run_dir / "model"), "--out", str(samples))
    metrics = json.loads((samples / "metrics.json").read_text())
    assert metrics["images"] == 4 and metrics["digit_images_scored"] == 4
    assert len(list(samples.glob("p*_s*.png"))) == 4
    # The score is of the saved images against their prompts' digits (not of other images or labels).
    assert metrics["digit_accuracy"] == pytest.approx(digit_accuracy_of(samples))


def test_unreachable_hub_id_is_a_clear_error(tmp_path):
    # No internet here (and HF_HUB_OFFLINE=1): the real huggingface_hub download path runs and fails.
    out = tmp_path / "model"
    proc = run_stage("fetch_model", tiny_config("model.pretrained=some-org/some-model"), "--out", str(out), check=False)
    assert proc.returncode == 2 and "could not download 'some-org/some-model'" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("model.tmp-*"))
