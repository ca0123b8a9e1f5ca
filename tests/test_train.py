"""The train stage: generated DeepSpeed config, data split, ZeRO stages, exact resume, signals, bad losses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_RUN, read_until, stage_argv, stage_env, tiny_config, train, train_args

from workflow.checkpoints import training_settings
from workflow.config import ConfigError
from workflow.distributed import EXIT_PREEMPTED
from workflow.ema import consolidate
from workflow.sharded_ema import load_ema
from workflow.engine import deepspeed_config, lr_factor
from workflow.latents import LatentStream
from workflow.families import FAMILIES
from workflow.profiling import StepProfiler, SyncSites, busy_us, gpu_busy_spans, gpu_idle_by_phase
from workflow.objective import min_snr_weights


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in records(run_dir)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 master weights (every ZeRO shard) and the gathered EMA of the last checkpoint."""
    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    weights, _ = consolidate(ckpt, tag)
    return {**{f"w.{k}": v for k, v in weights.items()}, **{f"ema.{k}": v for k, v in load_ema(ckpt, tag).items()}}


# ---------------------------------------------------------------- config (no processes)


def test_generated_deepspeed_config(tmp_path):
    ds = deepspeed_config(tiny_config("train.zero_stage=3", "train.offload_optimizer=cpu", "train.offload_params=cpu",
                                      "train.offload_optimizer_ratio=0.25",
                                      "train.precision=fp16", "train.grad_accum=4", "train.max_grad_norm=0.5",
                                      "train.deepspeed={'zero_optimization': {'stage3_max_live_parameters': 1000},"
                                      " 'wall_clock_breakdown': true}", "train.wandb.enabled=true"), 2, tmp_path)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 8 * 4 * 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_optimizer"]["ratio"] == 0.25  # partial offload reaches DeepSpeed
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
    (("train.zero_stage=0", "train.offload_optimizer=cpu"), "train.offload_optimizer"),
    # DeepSpeed reads the ratio in ZeRO-3 only: ZeRO-2 would offload everything, silently
    (("train.zero_stage=2", "train.offload_optimizer=cpu", "train.offload_optimizer_ratio=0.5"),
     "train.offload_optimizer_ratio: 0.5 needs train.offload_optimizer: cpu and train.zero_stage 3"),
    ("train.deepspeed={'train_batch_size': 64}", "train.deepspeed.train_batch_size: set train.micro_batch"),
    ("train.deepspeed={'bf16': {'enabled': true}}", "train.deepspeed.bf16.enabled: set train.precision"),
    # the loss scaler's settings tune fp16 only: with bf16 DeepSpeed would read and drop them
    ("train.deepspeed={'fp16': {'initial_scale_power': 32}}", "train.deepspeed.fp16: has no effect unless "
     "train.precision is fp16"),
    ("train.deepspeed={'zero_optimizations': {}}", "train.deepspeed.zero_optimizations: not a DeepSpeed config key"),
    ("train.deepspeed={'zero_optimization': {'stage': 3}}", "set train.zero_stage"),
    ("train.deepspeed={'zero_optimization': {'reduce_bucket_size': 1}}", "has no effect with train.zero_stage 0"),
    ("train.deepspeed={'zero_optimization': {'reduce_bucket_size': 'auto'}}", "\"auto\" is only resolved"),
    # torch reads the budget only when it partitions a compiled graph: eager it would do nothing
    ("train.activation_memory_budget=0.5", "train.activation_memory_budget: 0.5 needs train.compile: true"),
    (("train.compile=true", "train.activation_memory_budget=1.5"), "train.activation_memory_budget"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("train.lr_schedule=step", "train.lr_schedule"),
])
def test_values_deepspeed_would_ignore_are_rejected(override, names):
    with pytest.raises(ConfigError, match=names.replace("(", r"\(")):
        tiny_config(*(override if isinstance(override, tuple) else (override,)))


def test_loss_scaler_settings_reach_deepspeed_with_fp16(tmp_path):
    """fp16's tuning keys pass through to DeepSpeed's fp16 section beside train.precision's own
    (catches a merge that drops them, or one that lets them turn fp16 off)."""
    cfg = tiny_config("train.precision=fp16", "train.deepspeed={'fp16': {'initial_scale_power': 32}}")
    fp16 = deepspeed_config(cfg, 1, tmp_path)["fp16"]
    assert fp16 == {"enabled": True, "loss_scale": 0, "initial_scale_power": 32}, fp16


def test_stage3_keys_are_refused_below_stage_3():
    with pytest.raises(ConfigError, match="only used by ZeRO stage 3"):
        tiny_config("train.zero_stage=2", "train.deepspeed={'zero_optimization': {'stage3_prefetch_bucket_size': 10}}")


def test_lr_schedules_count_optimizer_steps():
    t = tiny_config("train.steps=110", "train.warmup_steps=10", "train.lr_schedule=constant").train
    assert [lr_factor(t, s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # warm-up, never scaled by ranks
    assert lr_factor(t, 109) == 1.0  # constant
    lin = t.model_copy(update={"lr_schedule": "linear"})
    assert lr_factor(lin, 10) == 1.0 and lr_factor(lin, 60) == pytest.approx(0.5)
    cos = t.model_copy(update={"lr_schedule": "cosine"})
    assert lr_factor(cos, 60) == pytest.approx(0.5) and lr_factor(cos, 110) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="auto"):  # bug caught: an unresolved `auto` silently run as cosine
        lr_factor(t.model_copy(update={"lr_schedule": "auto"}), 60)


def test_min_snr_weights():
    ac = torch.tensor([0.999, 0.5, 0.0])  # snr 999, 1, 0
    eps = min_snr_weights(ac, 5.0, "epsilon")
    assert eps.tolist() == pytest.approx([5 / 999, 1.0, 1.0], rel=1e-3)
    v = min_snr_weights(ac, 5.0, "v_prediction")
    assert v.tolist() == pytest.approx([5 / 1000, 0.5, 0.0], rel=1e-3)


def test_loss_options_change_what_the_model_sees_and_the_loss(built):
    """Each loss option does what its name says, on one fixed micro-batch (bugs caught: an option
    read from the config but never applied, input perturbation also perturbing the target, the
    min-SNR weights left out of the loss, caption dropout dropping nothing or everything)."""
    from types import SimpleNamespace

    from workflow.families import FAMILIES
    from workflow.train import diffusion_loss

    objective = FAMILIES["sd1"].objective(built["model"], "epsilon")
    stream = LatentStream(built["latents"], seed=0)
    batch = next(stream.batches(0, micro_batch=8))
    batch.pop("position")
    null_text = stream.null_text
    seen = {}

    def model(noisy, timesteps, encoder_hidden_states, added_cond_kwargs):  # predicts zeros: the loss is the target's size
        seen.update(noisy=noisy, timesteps=timesteps, text=encoder_hidden_states)
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    def run(*overrides: str) -> tuple[float, dict]:
        cfg = tiny_config("train.prediction_type=epsilon", "train.caption_dropout=0", *overrides)
        gen = torch.Generator().manual_seed(0)
        loss = diffusion_loss(model, objective, batch, (null_text, None), cfg, (0.5, 0.0), FAMILIES["sd1"], gen,
                              torch.device("cpu"), torch.float32)
        return float(loss), dict(seen)

    plain, inputs = run()
    is_null = (inputs["text"] == null_text).flatten(1).all(1)
    assert not is_null.any()
    assert run("train.caption_dropout=1.0")[1]["text"].eq(null_text).all()
    half = run("train.caption_dropout=0.5")[1]["text"]
    assert 0 < int((half == null_text).flatten(1).all(1).sum()) < 8  # a share of the captions, drawn per sample

    offset, offset_inputs = run("train.noise_offset=0.5")
    assert offset != pytest.approx(plain, rel=1e-3)  # the target (the noise) carries the offset
    # The offset is one value per sample and channel: it spreads the channels' means apart.
    def channel_mean_spread(noisy):
        return float(noisy.mean(dim=(2, 3)).std())

    assert channel_mean_spread(offset_inputs["noisy"]) > 1.5 * channel_mean_spread(inputs["noisy"])

    perturbed, perturbed_inputs = run("train.input_perturbation=0.5")
    assert not torch.allclose(perturbed_inputs["noisy"], inputs["noisy"])  # the input is perturbed
    assert perturbed == pytest.approx(plain, rel=1e-6)  # the target is not

    snr, snr_inputs = run("train.snr_gamma=5")
    weights = min_snr_weights(objective.scheduler.alphas_cumprod[inputs["timesteps"]], 5.0, "epsilon")
    assert torch.equal(snr_inputs["timesteps"], inputs["timesteps"]) and not torch.all(weights == 1)
    # Epsilon weights are min(snr, gamma) / snr <= 1: smaller where snr > gamma, 1 when gamma is never reached.
    assert snr < plain * (1 - 1e-3)
    assert run("train.snr_gamma=1e9")[0] == pytest.approx(plain, rel=1e-6)


# ---------------------------------------------------------------- data split


@pytest.mark.parametrize("world", [2, 3])  # 3 shards: 3 ranks divide them, 2 do not
def test_ranks_get_disjoint_equal_streams(built, world, monkeypatch):
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
    # Each rank reads only the shards its block touches: blocks are contiguous, so a shard is read by
    # two ranks only at a block boundary (bug caught: every rank reading, verifying and decoding all).
    import workflow.latents

    reads: list[str] = []
    real = workflow.latents.read_verified_shard
    monkeypatch.setattr(workflow.latents, "read_verified_shard", lambda d, shard: reads.append(shard["name"]) or real(d, shard))
    read_by_rank = []
    for rank in range(world):
        reads.clear()
        _take(LatentStream(built["latents"], seed=5, world_size=world, rank=rank).samples_from(0), per_rank)
        read_by_rank.append(set(reads))
    shards = {s["name"] for s in json.loads((built["latents"] / "manifest.json").read_text())["shards"]}
    assert set().union(*read_by_rank) == shards
    assert sum(map(len, read_by_rank)) <= len(shards) + world - 1, read_by_rank


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("which", ["square", "bucketed"])
def test_a_skipped_corrupt_shard_keeps_the_stream_position(built, bucketed, tmp_path, which):
    """Under train.skip_corrupt the samples (with buckets: the micro-batches) of a corrupt shard are
    passed over but still count in the stream position, and a stream resumed at any position
    continues exactly as the uninterrupted one (bug caught: a resumed run that reads other samples
    than the run it continues, because the position no longer counts the skipped ones)."""
    import shutil

    latents = tmp_path / "latents"
    shutil.copytree(built["latents"] if which == "square" else bucketed["latents"], latents)

    def stream() -> LatentStream:
        return LatentStream(latents, seed=0, world_size=2, rank=0, val_samples=64, skip_corrupt=True, micro_batch=8)

    straight_stream = stream()
    first_index = straight_stream._epoch_order(0)[0]
    first = straight_stream.shards[first_index]
    (latents / first["name"]).write_bytes((latents / first["name"]).read_bytes()[:1000])  # truncated
    straight = _take(straight_stream.batches(0, 8), 12)
    assert list(straight_stream.corrupt) == [first["name"]]
    positions = [b["position"] for b in straight]
    if which == "square":  # positions count samples: the first batch comes after the corrupt shard's
        assert positions[0] == straight_stream.counts[first_index] + 8
    else:  # positions count micro-batches: those holding a corrupt-shard sample are skipped
        assert positions[0] > 1 and positions == sorted(set(positions))
    for at in (1, 7):
        resumed = _take(stream().batches(positions[at - 1], 8), len(straight) - at)
        for a, b in zip(straight[at:], resumed):
            assert a["position"] == b["position"] and torch.equal(a["mean"], b["mean"])


# ---------------------------------------------------------------- engine runs


def test_zero_stages_agree_and_match_one_rank(built, zero_runs, tmp_path):
    """2 ranks x 8 under ZeRO 0-3 (and 3 with CPU offload) see the same data and compute the same
    fp32 losses; 1 rank x 16 (same global batch, its own data order) lands within noise of them,
    with gradient norms of the same size (bug caught: gradients summed, not averaged, over ranks
    or micro-batches: Adam hides the scale in the loss, the norm shows it). On that one rank,
    precision bf16-mixed (ZeRO-0: no all-reduce, foreach clipping) learns like fp32, with losses
    that differ from fp32's: the forward did run under autocast."""
    runs = {zero: losses(zero_runs[zero]) for zero in (0, 1, 2, 3)}
    train(built, tmp_path / "offload", *SHARED_RUN, "train.zero_stage=3", "train.offload_optimizer=cpu",
          "train.offload_params=cpu")  # DeepSpeed's CPU Adam
    runs["3 + offload"] = losses(tmp_path / "offload")
    for zero in (1, 2, 3, "3 + offload"):
        assert runs[zero] == pytest.approx(runs[0], rel=1e-4), f"ZeRO-{zero} differs from ZeRO-0"
    one_rank = ["train.procs=1", "train.micro_batch=16", "train.checkpoint_every=4"]
    train(built, tmp_path / "one", *one_rank)
    one = losses(tmp_path / "one")
    assert np.mean(one) == pytest.approx(np.mean(runs[0]), rel=0.1)
    assert one[-1] < one[0] and runs[0][-1] < runs[0][0]  # both learn
    norms = {name: np.mean([r["grad_norm"] for r in records(run_dir)])
             for name, run_dir in (("one", tmp_path / "one"), ("two", zero_runs[0]))}
    assert norms["one"] == pytest.approx(norms["two"], rel=0.25), norms

    train(built, tmp_path / "one-mixed", *one_rank, "train.precision=bf16-mixed")
    mixed = losses(tmp_path / "one-mixed")
    assert mixed != one and mixed == pytest.approx(one, rel=0.05) and mixed[-1] < mixed[0]
    assert json.loads((tmp_path / "one-mixed" / "train.json").read_text())["precision"] == "bf16-mixed"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def logged_steps(run_dir: Path) -> list[int]:
    log = run_dir / "log.jsonl"
    return [json.loads(line)["step"] for line in log.read_text().splitlines()] if log.is_file() else []


def latest_tag(run_dir: Path) -> str | None:
    latest = run_dir / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.is_file() else None


@dataclass
class Kill:
    """What a SIGKILL of a training run left: the exit status, the last step logged and the
    checkpoint `latest` named when it landed."""
    returncode: int
    last_logged: int
    latest: str | None

    @property
    def landed(self) -> bool:  # killed by the signal, not finished or failed on its own
        return self.returncode == -signal.SIGKILL


def kill_during(built, run_dir: Path, overrides: list[str], at_step: int, timeout: float = 300) -> Kill:
    """Start training and SIGKILL every process of it once the log shows `at_step`. The log of an
    earlier run in the same folder must end before `at_step` (its records past the checkpoint are
    trimmed on resume), else the kill would land during start-up."""
    assert max(logged_steps(run_dir), default=0) < at_step, f"the log already reaches step {at_step}"
    proc = subprocess.Popen(stage_argv("train", tiny_config(*overrides), *train_args(built, run_dir)), cwd=REPO,
                            env=stage_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and max(logged_steps(run_dir), default=0) < at_step:
        assert time.time() < deadline, f"training did not reach step {at_step} in {timeout} s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return Kill(proc.returncode, max(logged_steps(run_dir), default=0), latest_tag(run_dir))


def check_killed_run_resumes_bitwise(data, straight: Path, killed: Path, overrides: list[str], kill_at: int,
                                     latents: Path) -> None:
    """SIGKILL a run at step `kill_at` (after a complete checkpoint), rerun it, and hold it to the
    uninterrupted run in `straight`: the kill landed, the rerun resumed from that checkpoint (not
    afresh: training is deterministic, a fresh start would also match), every tensor equal, each
    step logged once."""
    kill = kill_during(data, killed, overrides, kill_at)
    assert kill.landed and kill.latest, kill
    proc = train(data, killed, *overrides, latents=latents)
    result = json.loads((killed / "train.json").read_text())
    resumed_from = result["resumed_from"]
    assert resumed_from == int(kill.latest[4:]) and f"resumed from step {resumed_from}" in proc.stdout
    a, b = final_weights(straight), final_weights(killed)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"killed at step {kill.last_logged}: {len(different)} tensors differ"
    assert logged_steps(killed) == list(range(1, result["final_step"] + 1))


@pytest.mark.parametrize("signum, whom", [(signal.SIGTERM, "every process"), (signal.SIGUSR1, "the launcher")])
def test_stop_signal_saves_and_exits_with_its_code(built, tmp_path, signum, whom):
    run_dir = tmp_path / "run"
    overrides = ["train.steps=400", "train.checkpoint_every=1000"]
    proc = subprocess.Popen(stage_argv("train", tiny_config(*overrides), *train_args(built, run_dir)), cwd=REPO,
                            env=stage_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 300
    while len(logged_steps(run_dir)) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
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
    if whom != "every process":
        return  # how a rerun resumes does not depend on the signal that stopped the run: checked once
    # A rerun with more steps extends the run from its checkpoint (it used to be a test of its own).
    rerun = train(built, run_dir, "train.steps=" + str(stopped_at + 2), "train.checkpoint_every=1000")
    result = json.loads((run_dir / "train.json").read_text())
    assert f"resumed from step {stopped_at}" in rerun.stdout and result["resumed_from"] == stopped_at
    assert result["final_step"] == stopped_at + 2 and logged_steps(run_dir) == list(range(1, stopped_at + 3))


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
    proc = subprocess.Popen(stage_argv("train", tiny_config("train.steps=2", "train.procs=1"), *train_args(built, run_dir)),
                            cwd=REPO, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        waiting = read_until(proc, "waiting for it to finish", timeout=120)
        assert "pid 4242" in waiting
        time.sleep(2)
        assert proc.poll() is None and not (run_dir / "checkpoints").exists() and not (run_dir / "log.jsonl").exists()
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert json.loads((run_dir / "train.json").read_text())["final_step"] == 2


def test_expandable_segments_reach_the_allocator():
    """train.expandable_segments (config/cards/24gb.yaml, which ran out of memory without them): the
    rank's call into torch's allocator settings exists in this torch and takes effect (bug caught: a
    setter torch renamed, which would fail only on a GPU, or a misspelt setting). In a fresh process:
    the setting is process-wide."""
    code = ("import torch; from workflow.gpu_memory import use_expandable_segments; use_expandable_segments(); "
            "print(torch._C._accelerator_getAllocatorSettings())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "expandable_segments:True"


ACTIVATION_BUDGET_PROBE = """
import json, torch
from workflow.engine import compile_forward

def saved_and_grad(budget):
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(256, 256), torch.nn.LayerNorm(256),
                                                              torch.nn.GELU())])
    compile_forward(net, "auto", 1, budget)
    x = torch.randn(512, 256, requires_grad=True)
    saved, weights = {}, {p.untyped_storage().data_ptr() for p in net.parameters()}
    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = net(x)
    y.square().mean().backward()
    return sum(n for k, n in saved.items() if k not in weights), x.grad

full, grad = saved_and_grad(None)
budgeted, budgeted_grad = saved_and_grad(0.1)
print(json.dumps({"full": full, "budgeted": budgeted, "grad_diff": (grad - budgeted_grad).abs().max().item()}))
"""


def test_activation_memory_budget_reaches_the_compiled_graph():
    """train.activation_memory_budget: what the compiled graph keeps for backward shrinks, and the
    gradients stay what they were. Bug caught: the budget set after torch partitioned the graph (or a
    torch setting renamed), which leaves a capped recipe's activations at full size, out of memory on
    the card it names. Inductor on this CPU compiles a small MLP correctly (its zero gradients are the
    UNet's, tests/test_compile_grads.py); a fresh process, the setting being process-wide."""
    out = subprocess.run([sys.executable, "-c", ACTIVATION_BUDGET_PROBE], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["budgeted"] < got["full"] / 4, got
    assert got["grad_diff"] < 1e-5, got


def test_changed_settings_are_named_and_resume_never_starts_fresh(built, tmp_path):
    """Bugs caught: a resume under changed settings (silently mixing two trainings), and
    resume=never resuming anyway or leaving the old checkpoints to be resumed later. One rank: the
    checks run before any rank starts."""
    run_dir = tmp_path / "run"
    one_rank = ["train.procs=1", "train.checkpoint_every=1", "train.keep_checkpoints=3"]
    train(built, run_dir, *one_rank, "train.steps=3")
    proc = train(built, run_dir, *one_rank, "train.steps=4", "train.lr=0.5", "train.snr_gamma=5", check=False)
    assert proc.returncode == 2
    assert "train.lr: 0.001 -> 0.5" in proc.stderr and "train.snr_gamma: None -> 5.0" in proc.stderr
    assert latest_tag(run_dir) == "step00000003"  # refused before anything was touched
    assert json.loads((run_dir / "train.json").read_text())["final_step"] == 3
    # fp16 on a machine without a GPU: refused by the checks before any rank starts (DeepSpeed's own
    # error came from every rank after start-up), before anything is touched
    from workflow.train import preflight

    with pytest.raises(ValueError, match="train.precision fp16 needs a GPU"):
        preflight(tiny_config(*one_rank, "train.steps=3", "train.precision=fp16"), built["latents"], built["model"],
                  built["data"], run_dir, 1)
    # A memory cap without a GPU would be a run that looks capped and is not (a card recipe tried here)
    with pytest.raises(ValueError, match="train.memory_cap_gb 24.0 needs a GPU"):
        preflight(tiny_config(*one_rank, "train.steps=3", "train.memory_cap_gb=24"), built["latents"], built["model"],
                  built["data"], run_dir, 1)
    # Compiled on the CPU, part of the UNet would get zero gradients and stay untrained, silently
    # (tests/test_compile_grads.py fails when torch fixes it: then lift this check)
    with pytest.raises(ValueError, match="train.compile needs a GPU: torch's CPU Inductor gives part of the UNet zero"):
        preflight(tiny_config(*one_rank, "train.steps=3", "train.compile=true"), built["latents"], built["model"],
                  built["data"], run_dir, 1)
    assert json.loads((run_dir / "train.json").read_text())["final_step"] == 3
    fresh = train(built, run_dir, *one_rank, "train.steps=2", "train.lr=0.5", "train.resume=never")
    assert "resumed" not in fresh.stdout
    assert json.loads((run_dir / "train.json").read_text())["resumed_from"] == 0
    # The old run's checkpoints are gone, not kept beside the new ones (step 3 would be "latest" later).
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step00000001", "step00000002"]


def test_options_train_and_log(built, tmp_path):
    """LoRA, bf16, grad accumulation, loss options, checkpointing and W&B offline in one run."""
    run_dir = tmp_path / "run"
    train(built, run_dir, "train.procs=1", "train.mode=lora", "train.lora.rank=4", "train.precision=bf16",
          "train.zero_stage=1",
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
    assert result["prediction_type"] == "epsilon"  # the override beat the model's own v_prediction
    assert all("lora_" in k for k in final_weights(run_dir))  # only adapters trained and checkpointed
    assert result["peak_gpu_allocated_gb"] is None  # no GPU here
    profile = json.loads((run_dir / "profile" / "summary.json").read_text())  # steps 2-4 profiled
    assert profile["steps"] == 3 and profile["wall_ms_per_step"] > 0 and profile["top_host"]
    assert "aten::" in (run_dir / "profile" / "ops.txt").read_text()


def test_selected_blocks_alone_recompute_and_gradients_stay_exact(built):
    """train.gradient_checkpointing as a list: catches a list that checkpoints every block (diffusers
    switches all at once) or none, a recomputation that changes the gradients, and a block name the
    model lacks reaching the ranks instead of an error that names the key."""
    from workflow.train import trainable_unet

    def gradients_and_runs(setting) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The gradients of one step, and how often each top-level block's resnets ran in it."""
        torch.manual_seed(0)
        unet = trainable_unet(tiny_config(f"train.gradient_checkpointing={setting}"), built["model"]).train()
        runs: dict[str, int] = {}
        for name, module in unet.named_modules():
            if re.search(r"resnets\.\d+$", name):
                block = name.split(".resnets")[0]
                # a pre-hook: the recomputation stops as soon as it has what backward needs, before a
                # forward hook would fire
                module.register_forward_pre_hook(lambda *_, b=block: runs.__setitem__(b, runs.get(b, 0) + 1))
        gen = torch.Generator().manual_seed(1)
        c = unet.config
        latents = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=gen)
        text = torch.randn(2, 4, c.cross_attention_dim, generator=gen)
        unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text).sample.square().mean().backward()
        return {n: p.grad for n, p in unet.named_parameters()}, runs

    plain, once = gradients_and_runs("false")
    grads, runs = gradients_and_runs("[down_blocks.0, up_blocks.1]")
    assert {block for block in runs if runs[block] > once[block]} == {"down_blocks.0", "up_blocks.1"}
    assert all(torch.equal(grads[n], plain[n]) for n in plain)
    _, runs = gradients_and_runs("true")
    assert all(runs[block] > once[block] for block in once) and len(once) == 5  # 2 down, mid, 2 up

    with pytest.raises(ValueError, match=r"train.gradient_checkpointing: \['up_blocks.7'\] not among .*mid_block"):
        trainable_unet(tiny_config("train.gradient_checkpointing=[up_blocks.7]"), built["model"])
    for bad in ("[down_block.0]", "[]", "[mid_block, mid_block]"):
        with pytest.raises(ConfigError, match="gradient_checkpointing"):
            tiny_config(f"train.gradient_checkpointing={bad}")
    # what it computes is the same, so a run that ran out of memory resumes with more blocks checkpointed
    assert training_settings(tiny_config("train.gradient_checkpointing=[up_blocks.1]")) == training_settings(tiny_config())


def test_activation_accounting_on_the_meta_device_matches_a_real_forward(built):
    """bench/activations.py counts what autograd keeps on PyTorch's meta device, with SDPA swapped for
    the flash kernel: catches the meta device's math attention (which keeps the attention matrix)
    leaking into the figures, tensors counted twice or weights counted, and checkpointed blocks not
    accounted as their kept inputs, by comparing with the same forward on the CPU, whose SDPA runs
    its flash kernel."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("activations", REPO / "bench" / "activations.py")
    activations = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(activations)
    model = str(built["model"])
    factor = activations.vae_factor(model)
    figures = {}
    for device in ("meta", "cpu"):
        for lora_rank in (None, 4):
            unet = activations.random_unet(model, torch.bfloat16, device, lora_rank)
            inputs = activations.unet_inputs(unet.config, 2, 32, factor, torch.bfloat16, device)
            figures[device, lora_rank] = [
                activations.saved_bytes(unet, inputs, blocks)
                for blocks in ([], ["down_blocks.0"], ["up_blocks.1", "mid_block"], FAMILIES["sd1"].blocks(unet.config))]
    for lora_rank in (None, 4):
        # Equal but for GroupNorm's saved mean and rstd (batch x groups values each), which the meta
        # kernel makes fp32 and the CPU kernel bf16: 0.16 % here. The math attention would add 47 %.
        assert figures["meta", lora_rank] == pytest.approx(figures["cpu", lora_rank], rel=0.005), figures
        none, *checkpointed = figures["meta", lora_rank]
        assert all(0 < kept < none for kept in checkpointed) and checkpointed[-1] == min(checkpointed)
    assert figures["meta", 4][0] < figures["meta", None][0]  # frozen layers keep less for backward


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


ZERO0_STEPS = """
import json, os, sys, torch
import torch.nn.functional as F
from pathlib import Path
from workflow.config import load_config
from workflow.distributed import init_world
from workflow.sharded_ema import zero0_masters
from workflow.engine import build_engine
from workflow.models import load_denoiser

init_world()  # as a rank starts: DeepSpeed's ops loaded with this venv's ninja (tests/conftest.py checks)
out = {}
for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
    cfg = load_config(Path("config.yaml"), [f"train.precision={precision}", "train.procs=1", "train.zero_stage=0",
                                            "train.lr=2e-3", "train.steps=300", "train.warmup_steps=50",
                                            "train.micro_batch=2", "train.compile=false"])
    unet = load_denoiser(Path(sys.argv[1]))
    before = {n: p.detach().clone().reshape(-1) for n, p in unet.named_parameters()}
    engine, _ = build_engine(cfg, unet, 1, Path(sys.argv[2]) / precision, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g)
        text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
        loss = F.mse_loss(engine(x.to(dtype), t, encoder_hidden_states=text.to(dtype)).sample.float(), x * 0.5)
        engine.backward(loss)
        fp32_norm = torch.nn.utils.get_total_norm([p.grad.float() for p in unet.parameters() if p.grad is not None])
        engine.step()
    # fp32 ZeRO-0 clips without keeping the norm (train.py reads it from the gradients as here)
    norm = fp32_norm.item() if precision == "fp32" else engine.get_global_grad_norm()
    masters = zero0_masters(engine.optimizer)
    moved = [(masters.get(id(p), p).detach().float().reshape(-1) - before[n]).abs().mean().item()
             for n, p in engine.module.named_parameters()]
    out[precision] = {"moved": sum(moved) / len(moved), "grad_norm": float(norm),
                      "skipped": engine.skipped_steps}
print(json.dumps(out))
"""


def cpu_has_fp16() -> bool:
    """What DeepSpeed's CPU accelerator asks before it takes fp16: oneDNN's fp16 kernels, which some x86-64
    CPUs have (recent Intel Xeons: AVX512-FP16/AMX) and others lack (e.g. AMD EPYC)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:  # an older torch without the query: no fp16 either
        return False


@pytest.mark.skipif(not cpu_has_fp16(), reason="this CPU has no oneDNN fp16 (DeepSpeed refuses fp16 here: 'Type fp16 "
                    "is not supported on your device'); the same check runs on the GPU machines")
def test_zero0_fp16_steps_as_far_as_fp32(built, tmp_path):
    """DeepSpeed 0.19.8's ZeRO-0 fp16 never scales the loss but unscales the gradients by 2^16
    (deepspeedai/DeepSpeed#8393): AdamW then steps by a fraction of fp32's (measured 0.3x here, a
    model that drew noise on a GPU). With the loss scaled (workflow/fast_step.py) three steps on the
    same inputs move the fp32 masters as far as fp32 training does, and the logged gradient norm is
    the true one, not the 2^16-scaled norm that DeepSpeed's fp16 optimizer reports. DeepSpeed's fp16
    runs on this CPU, slowly: a micro-batch of 2."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = stage_env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                         "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, "-c", ZERO0_STEPS, str(built["model"]), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    fp32, fp16 = got["fp32"], got["fp16"]
    assert fp16["skipped"] == 0, got
    # DeepSpeed's fp16 optimizer takes one zero-gradient AdamW step when it starts, so its bias correction
    # runs a step ahead: 0.86 x fp32's after 3 steps here, nearing 1 later. Unscaled: 0.2-0.3 x.
    assert 0.75 < fp16["moved"] / fp32["moved"] < 1.1, got
    assert abs(fp16["grad_norm"] / fp32["grad_norm"] - 1) < 0.05, got  # 2^16 x when reported scaled
