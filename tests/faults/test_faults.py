"""Fault injection on CPU with 2 ranks: kill, corrupt, misconfigure, fill the disk. Nothing may be
lost; every failure must be a clear error. `make test-faults` (and CI) runs it; the ledger prints
faults injected / survived / data lost at the end, each row from what its test checked and measured
(a failed check shows as survived NO)."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (REPO, TINY_OVERRIDES, run_stage, shared_once, stage_argv, stage_env, tiny_config, train,
                      train_args)
from documented import copy_repo, run_documented
from test_cache import assert_same_content, cache_args
from test_stages import test_train_refuses_a_stale_cache as stale_cache_check
from test_train import _take, final_weights, kill_during, latest_tag, logged_steps

from workflow.latents import LatentStream
from workflow.shards import AtomicTar, iter_shard, npy_bytes, npy_load
from workflow.train import EXIT_DIVERGED

pytestmark = pytest.mark.faults

RESUME = ["train.zero_stage=2", "train.steps=12", "train.checkpoint_every=2", "train.lr=3e-3"]


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    """Tensors that differ (or are missing): the data a fault lost."""
    return len(set(a) ^ set(b)) + sum(1 for k in set(a) & set(b) if not torch.equal(a[k], b[k]))


@pytest.fixture(scope="session")
def straight_run(built, tmp_path_factory) -> Path:
    """The uninterrupted run, trained once for both workers."""
    return shared_once(tmp_path_factory, "straight", lambda folder: train(built, folder, *RESUME))


@pytest.fixture(scope="session")
def straight(straight_run) -> dict[str, torch.Tensor]:
    return final_weights(straight_run)


def test_sigkill_at_five_random_steps(built, tmp_path, straight, ledger):
    """Five SIGKILLs of every training process at seeded steps after the first checkpoint, each
    later than the last step the previous run logged (so it lands mid-training, not in start-up);
    the final rerun resumes from the checkpoint the last kill left and ends bitwise equal to an
    uninterrupted run."""
    run_dir = tmp_path / "run"
    planned = sorted(random.Random(5).sample(range(3, 12), 5))
    kills = []
    for step in planned:
        at = max(step, kills[-1].last_logged + 1 if kills else 0)
        if at >= 12:
            break
        with ledger.fault(f"SIGKILL of training at step {at}") as row:
            kill = kill_during(built, run_dir, RESUME, at)
            kills.append(kill)
            assert kill.landed and kill.latest is not None and kill.last_logged >= at, kill
            assert not (run_dir / "train.json").exists()
            row.data_lost = None  # measured once, after the final rerun
    assert len(kills) >= 3, f"only {len(kills)} kills landed before the end: {planned}"
    with ledger.fault(f"rerun after {len(kills)} kills (last at step {kills[-1].last_logged})") as row:
        train(built, run_dir, *RESUME)
        result = json.loads((run_dir / "train.json").read_text())
        row.data_lost = differing(straight, final_weights(run_dir))
        assert result["resumed_from"] == int(kills[-1].latest[4:]), (result, kills[-1])
        assert row.data_lost == 0, f"killed at {[k.last_logged for k in kills]}: {row.data_lost} tensors differ"


def test_sigkill_during_a_checkpoint_save(built, tmp_path, straight, ledger):
    """Kill every process while a checkpoint is half-written: `latest` still names the previous,
    complete one; the half-written one is never used; the rerun ends as if nothing happened."""
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    with ledger.fault("SIGKILL during a checkpoint save") as row:
        proc = subprocess.Popen(stage_argv("train", tiny_config(*RESUME), *train_args(built, run_dir)), cwd=REPO,
                                env=stage_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        partial, deadline = None, time.time() + 300
        while proc.poll() is None and partial is None and time.time() < deadline:
            if ckpt.is_dir():
                tags = [d for d in ckpt.glob("step*") if d.is_dir() and any(d.iterdir())]
                partial = next((d for d in tags if not (d / "meta.json").exists() and d.name != "step00000002"
                                and (ckpt / "latest").exists()), None)
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert partial is not None, "training ended (or timed out) before a save could be interrupted"
        assert proc.returncode == -signal.SIGKILL
        latest = latest_tag(run_dir)
        row.fault += f" ({partial.name}{'' if not (partial / 'meta.json').exists() else ', just completed'})"
        assert latest < partial.name and (ckpt / latest / "meta.json").is_file()
        # The checks before a start delete the half-written tag (it is never resumed, never kept).
        run_stage("train", tiny_config(*RESUME), *train_args(built, run_dir), "--preflight", "2")
        assert not partial.exists() and latest_tag(run_dir) == latest
        rerun = train(built, run_dir, *RESUME)
        assert f"resumed from step {int(latest[4:])}" in rerun.stdout
        row.data_lost = differing(straight, final_weights(run_dir))
        assert row.data_lost == 0


def killed_cache_check(built, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.Popen(stage_argv("cache", tiny_config(), *cache_args(built, out)), cwd=REPO, env=stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "shard-000000.tar.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the cache stage ended (or stalled) before its first shard"
        time.sleep(0.05)
    proc.kill()  # SIGKILL after the first shard, mid-way through the second
    proc.wait()
    assert proc.returncode == -9, "the kill did not land: caching had finished"
    assert not (out / "manifest.json").exists()
    run_stage("cache", tiny_config(), *cache_args(built, out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reused_shards"] >= 1
    assert not list(out.glob("*.tmp-*")), "a half-written shard was left behind"
    # Two CPU runs of the same encoder are not always bitwise equal here (seen once in CI: one std
    # value one fp16 rounding apart), so the rerun shard is compared like the 2-process one.
    assert_same_content(built["latents"], out, fp16_ulps=1)


def test_sigkill_during_caching(built, tmp_path, ledger):
    with ledger.fault("SIGKILL during caching"):
        killed_cache_check(built, tmp_path)  # rerun completes, identical shards, no truncated shard kept


@pytest.mark.parametrize("damage", ["truncated", "bytes flipped"])
def test_corrupt_latent_shard_is_named_or_skipped(built, tmp_path, damage, ledger):
    latents = tmp_path / "latents"
    shutil.copytree(built["latents"], latents)
    stream = LatentStream(latents, seed=0, world_size=2, rank=0, val_samples=64)
    first = stream.shards[stream._epoch_order(0)[0]]["name"]  # the first shard rank 0 reads
    path = latents / first
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))

    with ledger.fault(f"latent shard {damage}"):
        _corrupt_shard_checks(built, tmp_path, latents, first)


def _corrupt_shard_checks(built, tmp_path: Path, latents: Path, first: str) -> None:
    stopped = train(built, tmp_path / "stop", latents=latents, check=False)
    assert stopped.returncode == 2 and first in stopped.stderr, stopped.stderr[-2000:]
    assert not (tmp_path / "stop" / "train.json").exists()
    train(built, tmp_path / "skip", "train.skip_corrupt=true", latents=latents)
    result = json.loads((tmp_path / "skip" / "train.json").read_text())
    assert list(result["corrupt_shards_skipped"]) == [first] and result["final_step"] == 4


def test_stale_cache_is_refused(built, tmp_path, ledger):
    with ledger.fault("stale cache (resolution changed)"):
        stale_cache_check(built, tmp_path)


@pytest.mark.parametrize("override, key", [
    ("train.bogus=1", "train.bogus: unknown key"),
    ("train.steps=ten", "train.steps"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("train.lr=-0.1", "train.lr"),
    ("train.micro_batch=0", "train.micro_batch"),
    ("data.source=s3://bucket/images", "data.source"),
])
def test_config_errors_name_the_key_and_write_nothing(tmp_path, override, key, ledger):
    config = [k.replace(".", "__") + "=" + v for k, v in (o.split("=", 1) for o in TINY_OVERRIDES + [override])]
    with ledger.fault(f"config error {override}"):
        proc = subprocess.run([str(Path(sys.executable).with_name("snakemake")), "--snakefile", str(REPO / "Snakefile"),
                               "--directory", str(tmp_path), "--cores", "2", "--configfile", str(REPO / "config.yaml"),
                               "--config", *config], capture_output=True, text=True, env=stage_env(), timeout=300)
        assert proc.returncode != 0 and key in proc.stdout + proc.stderr
        assert not any((tmp_path / d).exists() for d in ("results", "resources", "logs"))


def test_missing_model_path_is_named(built, tmp_path, ledger):
    with ledger.fault("missing model path"):
        proc = run_stage("fetch_model", tiny_config("model.pretrained=/nonexistent/sd15"), "--data", str(built["data"]),
                         "--out", str(tmp_path / "model"), check=False)
        assert proc.returncode == 2 and "/nonexistent/sd15" in proc.stderr
        assert not (tmp_path / "model").exists()


def test_full_filesystem_while_saving(built, tmp_path, straight_run, straight, ledger):
    """A checkpoint that does not fit: clear error (exit 4), the previous checkpoint intact and
    resumable, the final weights as if nothing happened."""
    if os.geteuid() != 0:
        assert not os.environ.get("CI"), "CI runs as root: this fault must run there"
        pytest.skip("mounting a small tmpfs needs root")
    with ledger.fault("filesystem full while saving a checkpoint") as row:
        _full_filesystem_checks(built, tmp_path, straight_run, straight, row)


def _full_filesystem_checks(built, tmp_path: Path, straight_run: Path, straight, row) -> None:
    # One checkpoint's size: the uninterrupted run's last (every checkpoint of these settings is as big).
    checkpoint = straight_run / "checkpoints" / latest_tag(straight_run)
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) + (2 << 20)}", "tmpfs", str(mount)], check=True)
    try:
        run_dir = mount / "run"
        proc = train(built, run_dir, *RESUME, "train.keep_checkpoints=2", check=False)
        assert proc.returncode == 4, (proc.stdout + proc.stderr)[-3000:]
        assert "step00000002 is intact" in proc.stderr
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000002"
        rescued = tmp_path / "rescued"
        shutil.copytree(run_dir, rescued)  # as a user would: move the run to a disk with space
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    rerun = train(built, rescued, *RESUME)
    assert "resumed from step 2" in rerun.stdout
    row.data_lost = differing(straight, final_weights(rescued))
    assert row.data_lost == 0


def _poison_latents(built, dst: Path, source_ids: set[int]) -> None:
    """A copy of the latent cache whose samples `source_ids` have NaN latents."""
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


def non_finite_check(built, tmp_path: Path) -> None:
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


def test_non_finite_loss(built, tmp_path, ledger):
    with ledger.fault("NaN in the latents (non-finite loss)"):
        non_finite_check(built, tmp_path)  # skipped + counted; then stopped


def test_local_profile_retry_resumes_a_killed_rank(tmp_path, ledger):
    """`snakemake --profile profiles/local` as the README shows it (a copy of the checkout, its root
    as the working directory), told by --config what to train: one training rank is SIGKILLed after
    a checkpoint; the launcher stops the other, the job fails, the profile's `retries: 1` restarts it
    and the retry resumes from that checkpoint. Catches a profile whose retries do not reach
    Snakemake (the job would stay failed) and a retry that starts over (resumed_from 0)."""
    repo = copy_repo(tmp_path / "repo")
    overrides = [o for o in TINY_OVERRIDES if not o.startswith(("train.steps", "train.checkpoint_every"))]
    overrides += ["train.steps=60", "train.checkpoint_every=10"]
    config = " ".join(k.replace(".", "__") + "=" + shlex.quote(v) for k, v in (o.split("=", 1) for o in overrides))
    command = f"snakemake --profile profiles/local --until train --config {config}"
    with ledger.fault("SIGKILL of one training rank under --profile profiles/local (retries: 1)") as row:
        proc = run_documented(command, repo, wait=False)
        run_dir = repo / "results" / "runs" / "digits-tiny"
        deadline = time.time() + 600
        while not (latest_tag(run_dir) and max(logged_steps(run_dir), default=0) > int(latest_tag(run_dir)[4:])):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "no checkpoint and a later step in 600 s"
            time.sleep(0.2)
        killed_after = int(latest_tag(run_dir)[4:])
        # rank 1: a started rank by its environment, a rank forked on the CPU by its name (distributed.ForkedRank)
        ranks = [pid for pid in _pids_in(repo) if "-mworkflow.train" in _cmdline(pid)
                 and (_environ(pid).get("RANK") == "1" or _comm(pid) == "train rank 1")]
        assert len(ranks) == 1, f"rank 1 of training not found: {ranks}"
        os.kill(ranks[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-4000:]
        assert "Error in rule train" in out, "the kill did not fail the job (it landed after training ended?)"
        result = json.loads((run_dir / "train.json").read_text())
        row.fault += " (data lost: in steps never trained)"
        row.data_lost = 60 - result["final_step"]
        assert result["resumed_from"] >= killed_after > 0 and result["final_step"] == 60, result


def _pids_in(folder: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == folder:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _environ(pid: int) -> dict[str, str]:
    try:
        entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return {}
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b"").decode(errors="replace")
    except OSError:
        return ""
