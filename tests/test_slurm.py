"""The pipeline on a real one-node Slurm cluster: `snakemake --profile slurm` from a copy of the repo
whose profiles/slurm/config.yaml has this cluster's site settings (what the README has a user edit).

Every stage is a Slurm job; training runs as 2 srun tasks (one per fake GPU, gloo on the CPU);
a time-limit warning (SIGUSR1) makes training save and exit 75, and the retry resumes; a job
cancelled with scancel is resumed by the next run from its last checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
import yaml
from conftest import REPO, TINY_OVERRIDES, stage_env
from documented import copy_repo

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
pytestmark = pytest.mark.slurm

# The test cluster's two "GPUs" are gres entries; its ranks are CPU processes (gloo). `auto` chooses for
# the GPUs the slurm: section asks for (ZeRO-2, bf16), as it must on a real cluster's login node, so
# this CPU cluster sets the CPU's settings by name.
SLURM_OVERRIDES = ["slurm.gpus_per_node=2", "slurm.cpus_per_gpu=1", "slurm.mem_mb_per_gpu=2000",
                   "slurm.train_minutes=20", "slurm.signal_seconds=60", "slurm.cache_minutes=10",
                   "slurm.sample_minutes=10", "slurm.merge_minutes=10", "train.precision=fp32", "train.zero_stage=0"]


@pytest.fixture(scope="module")
def cluster():
    slurm_cluster.install()
    slurm_cluster.start()
    yield
    slurm_cluster.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One copy of the repo for the module: the later tests reuse the prepared data, model and latent
    cache (each under its own run name), so only their training and what follows runs again."""
    return copy_repo(tmp_path_factory.mktemp("slurm") / "repo")


def edit_site_settings(workdir: Path, tmp_path: Path, retries: int = 1) -> None:
    """profiles/slurm/config.yaml (reached through the `slurm` link) with this cluster's site
    settings, as a user edits it; shorter waits and retries for the tests."""
    path = workdir / "slurm" / "config.yaml"
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"] = {"slurm_partition": "debug", "runtime": 10, "mem_mb": 1000}
    profile |= {"slurm-no-account": True, "slurm-status-command": "squeue", "jobs": 2, "retries": retries,
                "latency-wait": 5, "slurm-init-seconds-before-status-checks": 2,
                "slurm-logdir": str(tmp_path / "slurm_logs"), "slurm-keep-successful-logs": True}
    path.write_text(yaml.safe_dump(profile))


def snakemake(workdir: Path, *overrides: str, wait: bool = True, until: str | None = None):
    """`snakemake --profile slurm --config ...` typed in the repo root (`--until train`: the tests
    of resuming stop there; the first test runs every stage as a job)."""
    config = [k.replace(".", "__") + "=" + v for k, v in (o.split("=", 1) for o in TINY_OVERRIDES + SLURM_OVERRIDES
                                                          + list(overrides))]
    cmd = [SNAKEMAKE, "--profile", "slurm", *(["--until", until] if until else []), "--config", *config]
    if not wait:
        return subprocess.Popen(cmd, cwd=workdir, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(cmd, cwd=workdir, env=stage_env(), capture_output=True, text=True, timeout=1500)


def running_train_job() -> str | None:
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i %k"], capture_output=True, text=True).stdout
    return next((line.split()[0] for line in out.splitlines() if "train" in line), None)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoint_step(run: Path) -> int:
    latest = run / "checkpoints" / "latest"
    return int(latest.read_text().strip()[4:]) if latest.is_file() else 0


def test_pipeline_runs_as_slurm_jobs_with_srun_training(cluster, workdir, tmp_path):
    edit_site_settings(workdir, tmp_path)
    proc = snakemake(workdir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    run = workdir / "results" / "runs" / "digits-tiny"
    for rule in ("prepare", "fetch_model", "cache", "train", "ema", "sample", "export", "report_files"):
        assert list((tmp_path / "slurm_logs" / f"rule_{rule}").rglob("*.log")), f"{rule} was not a Slurm job"
    result = json.loads((run / "train.json").read_text())
    assert result["world_size"] == 2 and result["final_step"] == 4
    log = (workdir / "logs" / "digits-tiny" / "train.log").read_text()
    assert "train: done at step 4" in log
    # The ranks were srun tasks, not processes the stage's own launcher started (both give world_size 2).
    assert all(f"train: rank {r} of 2 is srun task {r} of job" in log for r in (0, 1)), log[-3000:]
    assert (run / "samples" / "metrics.json").is_file() and (run / "model" / "model_index.json").is_file()
    assert (run / "export" / "digits-tiny.safetensors").is_file()


def test_time_limit_signal_saves_and_the_retry_resumes(cluster, workdir, tmp_path):
    edit_site_settings(workdir, tmp_path)
    run = workdir / "results" / "runs" / "slurm-usr1"
    steps = ["run=slurm-usr1", "train.steps=40", "train.checkpoint_every=1000", "train.log_every=5"]
    proc = snakemake(workdir, *steps, wait=False, until="train")
    job = wait_for(running_train_job, 600, "the train job")
    wait_for(lambda: (run / "log.jsonl").is_file() and (run / "log.jsonl").read_text().count("\n") >= 2, 300,
             "training steps")
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # what --signal=USR1@<s> sends
    out, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0, out[-6000:]
    log = (workdir / "logs" / "slurm-usr1" / "train.log").read_text()
    result = json.loads((run / "train.json").read_text())
    assert 0 < result["resumed_from"] < 40 and result["final_step"] == 40, log[-3000:]


def test_cancelled_job_is_resumed_by_the_next_run(cluster, workdir, tmp_path):
    edit_site_settings(workdir, tmp_path, retries=0)
    run = workdir / "results" / "runs" / "slurm-cancel"
    steps = ["run=slurm-cancel", "train.steps=30", "train.checkpoint_every=5"]
    proc = snakemake(workdir, *steps, wait=False, until="train")
    wait_for(lambda: checkpoint_step(run) >= 5, 900, "a checkpoint")
    subprocess.run(["scancel", "--user", "root"], check=True)
    proc.communicate(timeout=600)
    saved = checkpoint_step(run)
    assert saved >= 5 and not (run / "train.json").exists()
    again = snakemake(workdir, *steps, until="train")
    assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]
    result = json.loads((run / "train.json").read_text())
    assert result["resumed_from"] >= saved and result["final_step"] == 30
