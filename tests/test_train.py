"""The train stage: generated DeepSpeed config, data split, ZeRO stages, exact resume, signals, bad losses."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_stage, stage_env, tiny_config

from workflow.config import ConfigError
from workflow.distributed import EXIT_PREEMPTED
from workflow.ema import consolidate, load_ema
from workflow.engine import deepspeed_config, lr_factor
from workflow.latents import LatentStream
from workflow.profiling import StepProfiler, SyncSites, busy_us, gpu_busy_spans, gpu_idle_by_phase
from workflow.shards import AtomicTar, iter_shard, npy_bytes, npy_load
from workflow.train import EXIT_DIVERGED, min_snr_weights


def train_args(built, run_dir: Path) -> list[str]:
    return ["--latents", str(built["latents"]), "--model", str(built["model"]), "--data", str(built["data"]),
            "--run-dir", str(run_dir)]


def train(built, run_dir: Path, *overrides: str, check: bool = True, latents: Path | None = None):
    args = train_args(built, run_dir)
    if latents:
        args[1] = str(latents)
    return run_stage("train", tiny_config(*overrides), *args, check=check)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 master weights (every ZeRO shard) and the gathered EMA of the last checkpoint."""
    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    weights, _ = consolidate(ckpt, tag)
    return {**{f"w.{k}": v for k, v in weights.items()}, **{f"ema.{k}": v for k, v in load_ema(ckpt, tag).items()}}


# ---------------------------------------------------------------- config (no processes)


def test_generated_deepspeed_config(tmp_path):
    ds = deepspeed_config(tiny_config("train.zero_stage=3", "train.offload_optimizer=cpu", "train.offload_params=cpu",
                                      "train.precision=fp16", "train.grad_accum=4", "train.max_grad_norm=0.5",
                                      "train.deepspeed={'zero_optimization': {'stage3_max_live_parameters': 1000},"
                                      " 'wall_clock_breakdown': true}", "train.wandb.enabled=true"), 2, tmp_path)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 8 * 4 * 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == 1000  # raw keys merged last
    assert ds["wall_clock_breakdown"] is True and ds["wandb"]["enabled"] is True
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16} and not ds["bf16"]["enabled"]
    plain = deepspeed_config(tiny_config("train.precision=bf16"), 1, tmp_path)
    assert plain["bf16"]["enabled"] and plain["zero_optimization"] == {"stage": 0} and "wandb" not in plain
    # No per-step device synchronisation from DeepSpeed's throughput timer or bf16 gradient scan.
    assert plain["timers"]["throughput"]["enabled"] is False and plain["bf16"]["check_grad_overflow"] is False


@pytest.mark.parametrize("override, names", [
    ("train.offload_params=cpu", "train.offload_params"),
    ("train.offload_optimizer=cpu", "train.offload_optimizer"),
    ("train.deepspeed={'train_batch_size': 64}", "train.deepspeed.train_batch_size: set train.micro_batch"),
    ("train.deepspeed={'bf16': {'enabled': true}}", "train.deepspeed.bf16: set train.precision"),
    ("train.deepspeed={'zero_optimizations': {}}", "train.deepspeed.zero_optimizations: not a DeepSpeed config key"),
    ("train.deepspeed={'zero_optimization': {'stage': 3}}", "set train.zero_stage"),
    ("train.deepspeed={'zero_optimization': {'reduce_bucket_size': 1}}", "has no effect with train.zero_stage 0"),
    ("train.deepspeed={'zero_optimization': {'reduce_bucket_size': 'auto'}}", "\"auto\" is only resolved"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("train.lr_schedule=step", "train.lr_schedule"),
])
def test_values_deepspeed_would_ignore_are_rejected(override, names):
    with pytest.raises(ConfigError, match=names.replace("(", r"\(")):
        tiny_config(override)


def test_stage3_keys_are_refused_below_stage_3():
    with pytest.raises(ConfigError, match="only used by ZeRO stage 3"):
        tiny_config("train.zero_stage=2", "train.deepspeed={'zero_optimization': {'stage3_prefetch_bucket_size': 10}}")


def test_lr_schedules_count_optimizer_steps():
    t = tiny_config("train.steps=110", "train.warmup_steps=10").train
    assert [lr_factor(t, s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # warm-up, never scaled by ranks
    assert lr_factor(t, 109) == 1.0  # constant
    lin = t.model_copy(update={"lr_schedule": "linear"})
    assert lr_factor(lin, 10) == 1.0 and lr_factor(lin, 60) == pytest.approx(0.5)
    cos = t.model_copy(update={"lr_schedule": "cosine"})
    assert lr_factor(cos, 60) == pytest.approx(0.5) and lr_factor(cos, 110) == pytest.approx(0.0)


def test_min_snr_weights():
    ac = torch.tensor([0.999, 0.5, 0.0])  # snr 999, 1, 0
    eps = min_snr_weights(ac, 5.0, "epsilon")
    assert eps.tolist() == pytest.approx([5 / 999, 1.0, 1.0], rel=1e-3)
    v = min_snr_weights(ac, 5.0, "v_prediction")
    assert v.tolist() == pytest.approx([5 / 1000, 0.5, 0.0], rel=1e-3)


# ---------------------------------------------------------------- data split


@pytest.mark.parametrize("world", [2, 3])  # 3 shards: 3 ranks divide them, 2 do not
def test_ranks_get_disjoint_equal_streams(built, world):
    count = LatentStream(built["latents"], seed=5).count
    streams = [LatentStream(built["latents"], seed=5, world_size=world, rank=r) for r in range(world)]
    per_rank = count // world
    epochs = [[s["meta"]["source_id"] for s in _take(st.samples_from(0), 2 * per_rank)] for st in streams]
    for e in range(2):
        blocks = [set(keys[e * per_rank : (e + 1) * per_rank]) for keys in epochs]
        assert sum(len(b) for b in blocks) == len(set().union(*blocks)) == per_rank * world  # disjoint
    assert epochs[0][:per_rank] != epochs[0][per_rank:]  # reshuffled per epoch
    resumed = [s["meta"]["source_id"] for s in _take(streams[1].samples_from(per_rank - 3), 6)]
    assert resumed == epochs[1][per_rank - 3 : per_rank + 3]  # a position resumes exactly, across epochs
    read = LatentStream(built["latents"], seed=5, world_size=world, rank=0)
    _take(read.samples_from(0), per_rank)
    # Each rank reads only the shards its block touches (here: not all three for 3 ranks).
    assert world == 2 or read._loaded is not None


def _take(it, n):
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------- engine runs


def test_zero_stages_agree_and_match_one_rank(built, tmp_path):
    """2 ranks x 8 under ZeRO 0-3 (and 3 with CPU offload) see the same data and compute the same
    fp32 losses; 1 rank x 16
    (same global batch, its own data order) lands within noise of them. On that one rank,
    precision bf16-mixed (ZeRO-0: no all-reduce, foreach clipping) learns like fp32, with losses
    that differ from fp32's: the forward did run under autocast."""
    steps = ["train.steps=6", "train.checkpoint_every=100"]
    runs = {}
    for zero in (0, 1, 2, 3):
        train(built, tmp_path / f"z{zero}", *steps, f"train.zero_stage={zero}")
        runs[zero] = losses(tmp_path / f"z{zero}")
    train(built, tmp_path / "offload", *steps, "train.zero_stage=3", "train.offload_optimizer=cpu",
          "train.offload_params=cpu")  # DeepSpeed's CPU Adam
    runs["3 + offload"] = losses(tmp_path / "offload")
    for zero in (1, 2, 3, "3 + offload"):
        assert runs[zero] == pytest.approx(runs[0], rel=1e-4), f"ZeRO-{zero} differs from ZeRO-0"
    train(built, tmp_path / "one", *steps, "train.procs=1", "train.micro_batch=16")
    one = losses(tmp_path / "one")
    assert np.mean(one) == pytest.approx(np.mean(runs[0]), rel=0.1)
    assert one[-1] < one[0] and runs[0][-1] < runs[0][0]  # both learn

    train(built, tmp_path / "one-mixed", *steps, "train.procs=1", "train.micro_batch=16", "train.precision=bf16-mixed")
    mixed = losses(tmp_path / "one-mixed")
    assert mixed != one and mixed == pytest.approx(one, rel=0.05) and mixed[-1] < mixed[0]
    assert json.loads((tmp_path / "one-mixed" / "train.json").read_text())["precision"] == "bf16-mixed"


def _kill_during(built, run_dir: Path, overrides: list[str], at_step: int) -> None:
    """Start training and SIGKILL every process of it once the log shows `at_step`."""
    cfg = tiny_config(*overrides)
    cmd = [sys.executable, "-m", "workflow.train", "--config", json.dumps(cfg.model_dump(mode="json")),
           *train_args(built, run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=stage_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run_dir / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and any(json.loads(line)["step"] >= at_step for line in log.read_text().splitlines()):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_killed_and_resumed_run_is_bitwise_identical(built, tmp_path, mode):
    overrides = ["train.zero_stage=2", "train.steps=8", "train.checkpoint_every=3", f"train.mode={mode}",
                 "train.lora.dropout=0.1", "train.lr=3e-3"]
    train(built, tmp_path / "straight", *overrides)
    kill_at = random.Random().randint(2, 7)
    _kill_during(built, tmp_path / "killed", overrides, kill_at)
    proc = train(built, tmp_path / "killed", *overrides)
    if kill_at > 3:  # killed at step 3 itself, the step-3 checkpoint may not have been complete yet
        assert "resumed from step" in proc.stdout, proc.stdout[-1000:]
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert straight.keys() == resumed.keys()
    if mode == "lora":
        assert all("lora_" in k for k in straight)  # only the adapters are trained (and checkpointed)
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, f"killed at step {kill_at}: {len(different)} tensors differ, e.g. {different[:3]}"
    assert [json.loads(x)["step"] for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()] == list(range(1, 9))


@pytest.mark.parametrize("signum, whom", [(signal.SIGTERM, "every process"), (signal.SIGUSR1, "the launcher")])
def test_stop_signal_saves_and_exits_with_its_code(built, tmp_path, signum, whom):
    run_dir = tmp_path / "run"
    overrides = ["train.steps=400", "train.checkpoint_every=1000"]
    cfg = tiny_config(*overrides)
    cmd = [sys.executable, "-m", "workflow.train", "--config", json.dumps(cfg.model_dump(mode="json")),
           *train_args(built, run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=stage_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = run_dir / "log.jsonl"
    while not (log.is_file() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    if whom == "every process":
        os.killpg(proc.pid, signum)  # what Slurm does with --signal
    else:
        os.kill(proc.pid, signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out[-2000:]
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped_at = json.loads((run_dir / "checkpoints" / tag / "meta.json").read_text())["step"]
    assert 2 <= stopped_at < 400 and f"checkpoint saved at step {stopped_at}" in out
    rerun = train(built, run_dir, "train.steps=" + str(stopped_at + 2), "train.checkpoint_every=1000")
    assert f"resumed from step {stopped_at}" in rerun.stdout
    assert json.loads((run_dir / "train.json").read_text())["final_step"] == stopped_at + 2


def test_a_second_training_waits_for_the_one_still_writing_the_run(built, tmp_path):
    """Bug caught: after Snakemake was killed, its training saves a checkpoint before exiting; a
    rerun typed meanwhile deleted that half-written checkpoint (as cut short) and trained beside it.
    Here the test holds the run folder's lock as that training would: the stage waits, starts
    nothing, and trains once the lock is free."""
    import fcntl

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = open(run_dir / "train.lock", "a+")
    fcntl.flock(holder, fcntl.LOCK_EX)
    holder.write("4242\n")
    holder.flush()
    cfg = tiny_config("train.steps=2", "train.procs=1")
    cmd = [sys.executable, "-m", "workflow.train", "--config", json.dumps(cfg.model_dump(mode="json")),
           *train_args(built, run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        waiting = ""
        deadline = time.time() + 120
        while "waiting for it to finish" not in waiting:
            assert proc.poll() is None and time.time() < deadline, waiting + (proc.stdout.read() or "")
            waiting += proc.stdout.readline()
        assert "pid 4242" in waiting
        time.sleep(2)
        assert proc.poll() is None and not (run_dir / "checkpoints").exists() and not (run_dir / "log.jsonl").exists()
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert json.loads((run_dir / "train.json").read_text())["final_step"] == 2


def _poison_latents(built, dst: Path, source_ids: set[int]) -> None:
    """A copy of the latent cache whose samples `source_ids` have NaN latents."""
    import shutil

    shutil.copytree(built["latents"], dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for shard in manifest["shards"]:
        samples = list(iter_shard(dst / shard["name"]))
        with AtomicTar(dst / shard["name"]) as tar:
            for s in samples:
                if json.loads(s["json"])["source_id"] in source_ids:
                    mean = npy_load(s["mean.npy"])
                    s["mean.npy"] = npy_bytes(np.full_like(mean, np.nan))
                tar.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
        shard["sha256"] = tar.info["sha256"]  # a cache that really holds NaNs, not a corrupted file
    (dst / "manifest.json").write_text(json.dumps(manifest))


def test_non_finite_losses_are_skipped_then_stop_training(built, tmp_path):
    # Poison the first sample of rank 0's second micro-batch (micro_batch 8).
    stream = LatentStream(built["latents"], seed=0, world_size=2, rank=0, val_samples=tiny_config().train.val_samples)
    source_id = _take(stream.samples_from(8), 1)[0]["meta"]["source_id"]
    poisoned = tmp_path / "latents"
    _poison_latents(built, poisoned, {source_id})

    train(built, tmp_path / "skip", "train.steps=4", latents=poisoned)
    result = json.loads((tmp_path / "skip" / "train.json").read_text())
    assert result["bad_steps"] == 1 and result["final_step"] == 4 and np.isfinite(result["final_loss"])
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "skip").values())

    proc = train(built, tmp_path / "stop", "train.steps=4", "train.max_bad_steps=0", latents=poisoned, check=False)
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-2000:]
    assert "non-finite loss" in proc.stderr and "train.max_bad_steps" in proc.stderr
    assert not (tmp_path / "stop" / "train.json").exists()


def test_changed_settings_are_named_and_resume_never_starts_fresh(built, tmp_path):
    run_dir = tmp_path / "run"
    train(built, run_dir, "train.steps=2")
    proc = train(built, run_dir, "train.steps=3", "train.lr=0.5", "train.snr_gamma=5", check=False)
    assert proc.returncode == 2
    assert "train.lr: 0.001 -> 0.5" in proc.stderr and "train.snr_gamma: None -> 5.0" in proc.stderr
    fresh = train(built, run_dir, "train.steps=3", "train.lr=0.5", "train.resume=never")
    assert "resumed" not in fresh.stdout
    assert json.loads((run_dir / "train.json").read_text())["resumed_from"] == 0


def test_options_train_and_log(built, tmp_path):
    """LoRA, bf16, grad accumulation, loss options, checkpointing and W&B offline in one run."""
    run_dir = tmp_path / "run"
    train(built, run_dir, "train.mode=lora", "train.lora.rank=4", "train.precision=bf16", "train.zero_stage=1",
          "train.grad_accum=2", "train.snr_gamma=5", "train.noise_offset=0.05", "train.input_perturbation=0.1",
          "train.prediction_type=epsilon", "train.gradient_checkpointing=true", "train.lr_schedule=cosine",
          "train.keep_checkpoints=1", "train.wandb.enabled=true", "train.profile_at=1")
    records = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["grad_norm"] is not None and r["images_per_s"] > 0 for r in records)
    assert records[0]["lr"] == pytest.approx(5e-4)  # warm-up step 1 of 2
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step00000004"]
    assert (run_dir / "monitor" / "train" / "Train_loss.csv").is_file()
    assert list((run_dir / "monitor" / "wandb").glob("offline-run-*"))
    result = json.loads((run_dir / "train.json").read_text())
    assert result["mode"] == "lora" and result["prediction_type"] == "epsilon"
    assert result["peak_gpu_allocated_gb"] is None  # no GPU here
    profile = json.loads((run_dir / "profile" / "summary.json").read_text())  # steps 2-4 profiled
    assert profile["steps"] == 3 and profile["wall_ms_per_step"] > 0 and profile["top_host"]
    assert "aten::" in (run_dir / "profile" / "ops.txt").read_text()


def test_gpu_busy_counts_overlapping_kernels_once():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(start, end, device=DeviceType.CUDA, annotation=False, name="op"):
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), device_type=device,
                               is_user_annotation=annotation, name=name)

    kernels = [event(0, 10), event(5, 12), event(20, 25), event(21, 22)]  # two streams overlap
    others = [event(0, 100, annotation=True), event(0, 1000, DeviceType.CPU)]  # a step's GPU-side span, a host op
    assert busy_us(gpu_busy_spans(kernels + others)) == 17

    # Idle 12..20 ended while the host was in the optimizer step (inside backward's span), 25..40
    # while it read the loss; 45..50 outside any phase.
    def phase(start, end, name):
        return event(start, end, DeviceType.CPU, name=f"train/{name}")

    phases = [phase(0, 19, "backward"), phase(15, 21, "optimizer_step"), phase(22, 41, "loss_check")]
    events = kernels + others + phases + [event(40, 45), event(50, 60)]
    for e in events:  # the profiler's times are in microseconds: make these milliseconds
        e.time_range.start, e.time_range.end = e.time_range.start * 1000, e.time_range.end * 1000
    assert gpu_idle_by_phase(events, gpu_busy_spans(events), steps=1) == {"loss_check": 15, "optimizer_step": 8, "(outside the phases)": 5}


def test_profiler_counts_host_waits_and_names_sync_sites(tmp_path):
    x = torch.ones(64)
    profiler = StepProfiler(2, tmp_path, True, 0)
    for _ in range(6):
        if bool(torch.isfinite((x * 2).sum())):  # a host read of a tensor: on a GPU it waits for the device
            x = x + 1
        profiler.step()
    profiler.close()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["host_waits"] == [{"wait": "aten::_local_scalar_dense", "calls_per_step": 1.0,
                                      "ms_per_step": summary["host_waits"][0]["ms_per_step"]}]
    assert summary["sync_sites"] == []  # no GPU here: no sync warnings

    def reads_the_loss():  # what torch's sync debug mode does at a `.item()` on a GPU
        warnings.warn("called a synchronizing CUDA operation")

    sites = SyncSites()
    sites.start()
    for _ in range(3):
        reads_the_loss()
    sites.stop()
    [site] = sites.summary(3)
    assert site["calls_per_step"] == 1 and site["at"].startswith("tests/test_train.py:")
    assert " reads_the_loss <- tests/test_train.py:" in site["at"]


@pytest.mark.parametrize("norm", [3.0, 0.5, float("inf"), float("nan"), -1.0])
@pytest.mark.parametrize("clip, loss_scale", [(1.0, 1.0), (0.0, 4.0), (1.0, 8.0)])
def test_sync_free_zero_step_matches_deepspeed(norm, clip, loss_scale):
    """The patched norm masking and clipping give DeepSpeed's own results, value for value."""
    from types import SimpleNamespace

    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from workflow.fast_step import mask_non_finite, unscale_and_clip_on_device

    theirs, ours = torch.tensor(norm), torch.tensor(norm)
    mask_nan_or_inf_with_val_inplace(theirs)
    mask_non_finite(ours)
    assert torch.equal(theirs, ours)

    opt = SimpleNamespace(clip_grad=clip, loss_scale=loss_scale, device="cpu")
    grads = torch.randn(2, 5, generator=torch.Generator().manual_seed(0)) * 3
    expected, got = [grads[0].clone(), [grads[1].clone()]], [grads[0].clone(), [grads[1].clone()]]
    DeepSpeedZeroOptimizer.unscale_and_clip_grads(opt, expected, torch.tensor(norm))
    unscale_and_clip_on_device(opt, got, torch.tensor(norm))
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1][0], got[1][0])
