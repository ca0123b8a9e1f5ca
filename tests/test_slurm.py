"""The pipeline on a real two-node Slurm cluster (tests/slurm_cluster.py: each node a slurmd with its
own host name and address): `snakemake --profile slurm` from a copy of the repo whose
profiles/slurm/config.yaml has this cluster's site settings (what the README has a user edit).

Every stage is a Slurm job; training runs as srun tasks (one per fake GPU, gloo on the CPU), on both
nodes (`slurm__nodes=2`) or two on one. Two nodes: the merged model equals a one-node run's; a
time-limit warning (SIGUSR1) to the job makes every rank on both nodes save and exit 75, and the
retry resumes; a node lost mid-training (its slurmd and ranks killed) leaves the last complete
checkpoint, which the rerun continues on the one node left. One node: a job cancelled with scancel
is resumed by the next run from its last checkpoint.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
import torch
import yaml
from conftest import REPO, TINY_OVERRIDES, stage_env
from documented import copy_repo
from safetensors.torch import load_file

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


TWO_NODES = ["slurm.nodes=2", "slurm.gpus_per_node=1"]


def snakemake(workdir: Path, *overrides: str, wait: bool = True, until: str | None = None, profile: bool = True):
    """`snakemake --profile slurm --config ...` typed in the repo root (`--until train`: the tests
    of resuming stop there; the first test runs every stage as a job). profile=False: the same run
    on this machine (`snakemake --cores all`), not through Slurm."""
    config = [k.replace(".", "__") + "=" + v for k, v in (o.split("=", 1) for o in TINY_OVERRIDES + SLURM_OVERRIDES
                                                          + list(overrides))]
    where = ["--profile", "slurm"] if profile else ["--cores", "all"]
    cmd = [SNAKEMAKE, *where, *(["--until", until] if until else []), "--config", *config]
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


def rank_hosts(log: str, ranks: int) -> dict[int, str]:
    """{rank: host} from the stage's lines "train: rank R of N is srun task R of job J on HOST"."""
    found = {int(r): h for r, t, h in re.findall(rf"train: rank (\d+) of {ranks} is srun task (\d+) of job \d+ on (\S+)", log)
             if r == t}
    return found


def unet_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run / "model" / "unet").glob("*.safetensors")))


def test_pipeline_runs_as_slurm_jobs_on_two_nodes(cluster, workdir, tmp_path):
    """`snakemake --profile slurm --config slurm__nodes=2 slurm__gpus_per_node=1` (ZeRO-2): every stage a
    job, train one job with a rank on each node. Bugs caught: both tasks on one host, a rendezvous at
    an address the other node cannot reach, a rank map that gives both nodes rank 0, a merge that
    misses the shards written on the second host; and a model that differs from a one-node run's."""
    edit_site_settings(workdir, tmp_path)
    proc = snakemake(workdir, *TWO_NODES, "train.zero_stage=2")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    run = workdir / "results" / "runs" / "digits-tiny"
    for rule in ("prepare", "fetch_model", "cache", "train", "ema", "sample", "export", "report_files"):
        assert list((tmp_path / "slurm_logs" / f"rule_{rule}").rglob("*.log")), f"{rule} was not a Slurm job"
    result = json.loads((run / "train.json").read_text())
    assert result["world_size"] == 2 and result["final_step"] == 4
    log = (workdir / "logs" / "digits-tiny" / "train.log").read_text()
    assert "train: done at step 4" in log
    # The ranks were srun tasks on both nodes, not processes the stage's own launcher started.
    assert rank_hosts(log, 2) == {0: "dsd-node1", 1: "dsd-node2"}, log[-3000:]
    assert (run / "samples" / "metrics.json").is_file() and (run / "model" / "model_index.json").is_file()
    assert (run / "export" / "digits-tiny.safetensors").is_file()
    # The same run on one machine (2 local ranks, the same global batch) makes the same model: gloo's
    # sum of two ranks' gradients does not depend on where the ranks run.
    local = snakemake(workdir, "slurm.gpus_per_node=2", "train.zero_stage=2", "run=one-node", until="ema",
                      profile=False)
    assert local.returncode == 0, (local.stdout + local.stderr)[-6000:]
    one_node = workdir / "results" / "runs" / "one-node"
    assert json.loads((one_node / "train.json").read_text())["digest"] == result["digest"]
    a, b = unet_weights(run), unet_weights(one_node)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_time_limit_signal_saves_and_the_retry_resumes(cluster, workdir, tmp_path):
    """Two nodes, ZeRO-3: the signal reaches every rank on both hosts, each saves its part, and the
    retried job resumes from that checkpoint to the weights an uninterrupted run ends with."""
    edit_site_settings(workdir, tmp_path)
    run = workdir / "results" / "runs" / "slurm-usr1"
    steps = ["run=slurm-usr1", "train.steps=40", "train.checkpoint_every=1000", "train.log_every=5", *TWO_NODES,
             "train.zero_stage=3"]
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
    assert rank_hosts(log, 2) == {0: "dsd-node1", 1: "dsd-node2"}, log[-3000:]  # the retry's ranks too
    # Resumed bitwise: the same two-node run without the signal ends with the same fp32 weights, EMA
    # and Adam moments (train.json's checksums of every tensor, summed the same way on both).
    straight = snakemake(workdir, *steps[1:], "run=slurm-straight", until="train")
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-6000:]
    uninterrupted = json.loads((workdir / "results" / "runs" / "slurm-straight" / "train.json").read_text())
    assert uninterrupted["resumed_from"] == 0 and uninterrupted["digest"] == result["digest"]


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


def test_lost_node_run_continues_on_the_node_left(cluster, workdir, tmp_path):
    """Two nodes, ZeRO-2: the second node is lost mid-training (its slurmd and the ranks on it killed
    at once). Bugs caught: the surviving rank hanging until the time limit; a checkpoint the lost node
    did not finish being resumed; the rerun refusing a checkpoint of 2 ranks on 1 (the user's only
    way on while the node is gone) or not resuming from the step the checkpoint says."""
    edit_site_settings(workdir, tmp_path, retries=0)
    run = workdir / "results" / "runs" / "slurm-lost"
    steps = ["run=slurm-lost", "train.steps=30", "train.checkpoint_every=5", "train.zero_stage=2"]
    proc = snakemake(workdir, *steps, *TWO_NODES, wait=False, until="train")
    try:
        wait_for(lambda: checkpoint_step(run) >= 5, 900, "a checkpoint")
        slurm_cluster.lose_node("dsd-node2")
        # Rank 0 sees its peer go within seconds, not at the job's 20-minute limit; Slurm then fails
        # the job or, noticing the node down (its default JobRequeue), requeues it to wait for nodes.
        log = workdir / "logs" / "slurm-lost" / "train.log"
        wait_for(lambda: "task 0: Exited with exit code 1" in log.read_text(), 120, "rank 0 to stop")
        wait_for(lambda: not running_train_job(), 180, "the job to fail or be requeued")
        assert "Connection reset by peer" in log.read_text() or "Connection closed by peer" in log.read_text()
        subprocess.run(["scancel", "--user", "root"], check=True)  # the user gives up on the lost node
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode != 0, out[-3000:]
        saved = checkpoint_step(run)
        meta = json.loads((run / "checkpoints" / f"step{saved:08d}" / "meta.json").read_text())
        assert saved >= 5 and meta["world_size"] == 2 and not (run / "train.json").exists()
        # The node stays lost: go on with one node and 1 GPU, the global batch kept by grad_accum (the
        # CPU "GPU" count is train.procs here, as SLURM_OVERRIDES sets the CPU's settings by name).
        again = snakemake(workdir, *steps, "slurm.nodes=1", "slurm.gpus_per_node=1", "train.procs=1",
                          "train.grad_accum=2", until="train")
        assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]
    finally:
        slurm_cluster.restore_node("dsd-node2")
    result = json.loads((run / "train.json").read_text())
    log = (workdir / "logs" / "slurm-lost" / "train.log").read_text()
    assert result["resumed_from"] == saved and result["final_step"] == 30 and result["world_size"] == 1, log[-3000:]
    assert f"resumed from step {saved} (written by 2 ranks, continued on 1)" in log
    assert all((tag / "meta.json").is_file() for tag in (run / "checkpoints").glob("step*"))  # none half-written
