"""EMA in training and the merge stage: ZeRO-3 export, fp32 masters, LoRA export, post-hoc EMA, cadence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import LORA_RUN, SHARED_RUN, merge, tiny_config, train

from workflow.ema import checkpoint_denoiser, consolidate, reconstruct_posthoc, verify_against_engine
from workflow.sharded_ema import checksum, gather_fragments, load_ema, load_rank_files
from workflow.models import load_denoiser
from workflow.posthoc import sigma_rel_to_gamma, solve_coefficients


def merged_unet(folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()


def test_zero3_export_is_complete_and_equals_zero0(built, zero_runs):
    """The same fp32 training under ZeRO-0 and 2-rank ZeRO-3 (params partitioned: no rank holds a
    full tensor) merges to the same model, and each merge checks itself against the engine."""
    for zero in (0, 3):
        report = json.loads((zero_runs[zero] / "model" / "merge.json").read_text())
        assert report["verified_against_engine"] and report["weights"] == "ema"
    z0, z3 = merged_unet(zero_runs[0] / "model"), merged_unet(zero_runs[3] / "model")
    base = load_denoiser(built["model"]).state_dict()
    assert z3.keys() == base.keys()
    assert all(z3[k].shape == base[k].shape for k in base)
    # Reduce-scatter vs all-reduce sums in another order: ~1e-5 differences, except where a weight's
    # gradient is near zero and Adam, which steps by ~lr whatever the gradient's size, turns the
    # rounding into another step (one element in 221184 of one tensor moved 1.5e-4). A broken
    # export (a missing or misplaced partition) differs in most elements, by far more.
    t = tiny_config(*SHARED_RUN).train
    off = total = 0
    for k in base:
        diff = (z3[k] - z0[k]).abs()
        assert diff.max() <= 2 * t.lr * t.steps, (k, float(diff.max()))
        off += int((diff > 1e-4 + 1e-3 * z0[k].abs()).sum())
        total += diff.numel()
    assert off <= 1e-5 * total, f"{off} of {total} weights differ between ZeRO-3 and ZeRO-0"
    moved = sum(int((z3[k] - base[k]).abs().gt(1e-4 + 1e-3 * base[k].abs()).sum()) for k in base)
    assert moved > 0.5 * total, f"only {moved} of {total} weights trained"  # trained, not the base weights
    raw3 = merged_unet(zero_runs[3] / "model" / "unet_raw")  # the other set, kept beside it
    assert any(not torch.equal(raw3[k], z3[k]) for k in base)


def test_bf16_merge_takes_the_fp32_masters(built, tmp_path):
    """ZeRO-0 in bf16 keeps bf16 module weights; the merged model holds the optimizer's fp32 masters."""
    run_dir = tmp_path / "run"
    bf16 = ["train.precision=bf16", "train.steps=3", "train.procs=1"]
    train(built, run_dir, *bf16)
    assert merge(built, run_dir, *bf16)["verified_against_engine"]
    raw = merged_unet(run_dir / "model" / "unet_raw")
    base = load_denoiser(built["model"]).state_dict()
    # Trained (not the base, whose fp32 weights are not bf16-rounded either) and not bf16-rounded
    # (not the engine's bf16 module weights): the optimizer's fp32 masters.
    changed = [k for k in base if not torch.equal(raw[k], base[k])]
    assert len(changed) > 0.9 * len(base), f"{len(changed)} of {len(base)} tensors trained"
    assert all(not torch.equal(raw[k], raw[k].bfloat16().float()) for k in changed)


def test_merge_refuses_weights_that_differ_from_the_engine():
    w = {"a": torch.arange(6.0).view(2, 3)}
    verify_against_engine(w, {"a": checksum(w["a"]).tolist()}, "raw")
    swapped = {"a": w["a"].flip(1)}  # same values, misplaced: the position-weighted sum notices
    with pytest.raises(ValueError, match="differs from the weights the engine held"):
        verify_against_engine(swapped, {"a": checksum(w["a"]).tolist()}, "raw")
    # Fragments held by two ranks add up to the full tensor's checksum.
    flat = w["a"].view(-1)
    assert torch.allclose(checksum(flat[:4], 0) + checksum(flat[4:], 4), checksum(flat))
    assert torch.equal(gather_fragments([{"fragments": {"a": (4, flat[4:])}}, {"fragments": {"a": (0, flat[:4])}}])["a"], flat)


def test_lora_file_reloads_and_changes_the_output(built, lora_run):
    """The exported LoRA loads with diffusers' load_lora_weights and predicts what the fused model
    and the training checkpoint do. Bugs caught: a lost alpha (scale 2 here), and the training's
    adapter dropout written into the file's metadata (diffusers then builds train-mode dropout
    layers: every generation randomly perturbed)."""
    from diffusers import StableDiffusionPipeline

    report = json.loads((lora_run / "model" / "merge.json").read_text())
    model = lora_run / "model"
    assert report["lora_file"] == "pytorch_lora_weights.safetensors" and report["fused"]
    assert (model / "pytorch_lora_weights.safetensors").is_file()
    assert (model / "lora_ema" / "pytorch_lora_weights.safetensors").is_file()

    def image(pipe) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a handwritten digit 3", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                   output_type="pt")
        return out.images[0]

    load = dict(safety_checker=None, requires_safety_checker=False)
    pipe = StableDiffusionPipeline.from_pretrained(built["model"], **load)
    before = image(pipe)
    pipe.load_lora_weights(model)  # the diffusers-format file, as users load it
    assert (image(pipe) - before).abs().max() > 1e-3

    # The fused model, the base model with the LoRA file loaded and the sample stage's
    # per-checkpoint UNet (checkpoint_denoiser) predict the same noise (a lost alpha, scale 2, would
    # halve the adapters' share: a difference of half the adapters' effect, > 5e-3). Compared on one
    # UNet call: through a sampling loop with guidance 7.5, float rounding of fused vs separate
    # adapters grows with the trained weights. On one call that rounding reached 1.6e-4 for some
    # inputs (fp32, lr 5e-2 adapters), hence 1e-3, on inputs of their own seed.
    from_checkpoint = checkpoint_denoiser(tiny_config(*LORA_RUN), built["model"], lora_run / "checkpoints", "step00000008")
    fused_unet = load_denoiser(model)
    gen = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500]), torch.randn(1, 16, 64, generator=gen)
    with torch.no_grad():
        fused = fused_unet(x, t, text).sample
        effect = (fused - load_denoiser(built["model"])(x, t, text).sample).abs().max()
        torch.testing.assert_close(pipe.unet(x, t, text).sample, fused, atol=1e-3, rtol=0)
        torch.testing.assert_close(from_checkpoint(x, t, text).sample, fused, atol=1e-3, rtol=0)
    assert effect > 1e-2


def test_posthoc_reconstruction_matches_a_tracked_profile(built, tmp_path):
    """Track sigma_rel 0.05, 0.10 and 0.15; rebuild 0.10 from the 0.05 and 0.15 snapshots alone."""
    run_dir = tmp_path / "run"
    # a constant rate: the weights keep moving to the last step, so the three profiles differ (the
    # default run's cosine decay nearly stops them, and every profile ends near the same weights)
    overrides = ["train.steps=30", "train.checkpoint_every=100", "train.log_every=10", "train.lr_schedule=constant",
                 "ema.posthoc.sigma_rels=[0.05, 0.10, 0.15]", "ema.posthoc.snapshot_every=3"]
    train(built, run_dir, *overrides)
    report = merge(built, run_dir, *overrides, "ema.target_sigma_rel=0.10")
    assert report["weights"] == "posthoc-ema" and report["posthoc"]["relative_profile_error"] < 1e-6

    final = sorted((run_dir / "posthoc").glob("step*"))[-1]
    assert final.name == "step00000030"
    tracked = {s: gather_fragments([r["profiles"][s] for r in load_rank_files(final, "snapshot")]) for s in (0.05, 0.10)}
    without = tmp_path / "without_0.10"
    for snap in (run_dir / "posthoc").glob("step*"):
        (without / snap.name).mkdir(parents=True)
        for f in snap.glob("rank*.pt"):
            state = torch.load(f, weights_only=False)
            del state["profiles"][0.10]
            torch.save(state, without / snap.name / f.name)
    rebuilt, fit = reconstruct_posthoc(without, 30, 0.10)
    assert fit["relative_profile_error"] < 0.05

    def dist(a, b):
        return sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5

    # Much closer to the tracked 0.10 EMA than the nearest tracked neighbour is.
    assert dist(rebuilt, tracked[0.10]) < 0.2 * dist(tracked[0.05], tracked[0.10])


def test_posthoc_math():
    # sigma_rel <-> gamma as in the paper's table (wider profiles have smaller exponents).
    assert sigma_rel_to_gamma(0.10) < sigma_rel_to_gamma(0.05)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    x, err = solve_coefficients([100, 200], [6.94, 6.94], 200, 6.94)
    assert x == pytest.approx([0, 1], abs=1e-9) and err == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_ema_is_updated_once_per_optimizer_step(built, tmp_path, offload):
    """With grad_accum 2, decay 0.5 and no warm-up, the EMA after 3 steps is exactly the EMA of the
    3 optimizer steps' weights, not of 6 micro-steps; in host memory too, where it updates in a
    worker thread that every checkpoint must wait for (a checkpoint taken mid-update, or an update
    that missed a step, fails here)."""
    run_dir = tmp_path / "run"
    overrides = ["train.grad_accum=2", "train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=3",
                 "train.lr=1e-2", "ema.decay=0.5", "ema.warmup=false", "train.zero_stage=1", "train.procs=1",
                 f"ema.offload={offload}"]
    train(built, run_dir, *overrides)
    ckpt = run_dir / "checkpoints"
    expected = {k: v.float().reshape(-1) for k, v in load_denoiser(built["model"]).state_dict().items()}
    for step in (1, 2, 3):
        raw, _ = consolidate(ckpt, f"step{step:08d}")
        expected = {k: 0.5 * expected[k] + 0.5 * raw[k].reshape(-1) for k in expected}
    got = load_ema(ckpt, "step00000003")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_train_rules_ignore_merge_only_settings():
    from workflow.config import stage_config

    a = stage_config(tiny_config(), "train")
    b = stage_config(tiny_config("ema.use=false", "ema.fuse_lora=true", "ema.posthoc.sigma_rels=[0.1]",
                                 "ema.target_sigma_rel=0.1"), "train")
    assert a["ema"].keys() == {"decay", "warmup", "offload", "posthoc"}
    assert a != b  # the tracked profiles are training's business
    assert {k: v for k, v in b["ema"].items() if k != "posthoc"} == {k: v for k, v in a["ema"].items() if k != "posthoc"}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the pinned copy on a side stream needs a GPU"))])
def test_offloaded_ema_updates_beside_training_and_equals_the_in_step_update(device, monkeypatch):
    """`ema.offload: cpu` updates in a worker thread (from a pinned copy taken on a side stream when
    the masters are on the GPU). With a worker slowed down on purpose, the EMAs still equal the
    in-step update bitwise: catches an optimizer step that changes the masters before the worker
    (or the copy) read them (a missing fence), and a state_dict or digest read before the worker
    finished (a missing wait), which would return a step-old EMA."""
    import threading
    import time
    from types import SimpleNamespace

    from workflow.sharded_ema import ShardedEMA, TrainingEMAs

    in_step = ShardedEMA.update

    def slow_off_the_main_thread(self, step, values=None):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.05)
        in_step(self, step, values)

    monkeypatch.setattr(ShardedEMA, "update", slow_off_the_main_thread)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)).to(device)
    # As under ZeRO-1/2: each parameter's master is a slice of one flat fp32 partition that requires
    # grad (DeepSpeed sets it), which an in-place copy from it in grad mode must not trip over.
    flat_master = torch.cat([p.detach().float().reshape(-1) for p in module.parameters()]).requires_grad_()
    start = 0
    for p in module.parameters():
        p._hp_mapping = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=0),
                                        hp_fragment=flat_master.narrow(0, start, p.numel()))
        start += p.numel()
    masters = [p._hp_mapping.hp_fragment for p in module.parameters()]
    engine = SimpleNamespace(module=module, optimizer=SimpleNamespace())
    cfg = tiny_config("ema.offload=cpu", "ema.decay=0.7", "ema.warmup=false", "ema.posthoc.sigma_rels=[0.1]")
    emas = TrainingEMAs(cfg, engine, rank=0, world_size=1)
    assert emas.main.shadow[0].device.type == "cpu" and emas.offloaded.on_gpu == (device == "cuda")
    betas = {"main": emas.main.beta, "power": emas.power[0.1].beta}
    expected = {kind: [m.detach().cpu().clone() for m in masters] for kind in betas}
    for step in range(1, 6):
        emas.fence()
        with torch.no_grad():  # the optimizer step, on the training stream
            flat_master.add_(torch.randn_like(flat_master))
        emas.update(step)
        for kind, beta in betas.items():
            expected[kind] = [torch.lerp(e, m.detach().cpu(), 1.0 - beta(step)) for e, m in zip(expected[kind], masters)]
    state = emas.state_dict()
    got = {"main": [t for _, t in state["main"]["fragments"].values()],
           "power": [t for _, t in state["power"][0.1]["fragments"].values()]}
    for kind in betas:
        assert all(torch.equal(g, e) for g, e in zip(got[kind], expected[kind])), kind
