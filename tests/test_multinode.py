"""The multi-node pieces that need no cluster: which host each srun task runs on, and a rank that
never arrives (a node that failed to start) stopping the run with its rank and host named in a
bounded time, not at the job's time limit. The two-node runs are in tests/test_slurm.py."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from conftest import REPO, stage_argv, stage_env, tiny_config, train_args

from workflow.distributed import free_port, rank_hosts


def test_rank_hosts_follow_srun_block_distribution():
    """Bug caught: ranks mapped round-robin (rank 1 on the second node) while srun puts tasks 0..n-1
    on the first node: the missing-rank message would name the wrong host."""
    assert rank_hosts(["a", "b"], "2(x2)") == ["a", "a", "b", "b"]
    assert rank_hosts(["a", "b", "c"], "2(x2),1") == ["a", "a", "b", "b", "c"]
    assert rank_hosts(["a"], "1") == ["a"]


@pytest.mark.geometry
@pytest.mark.parametrize("alone", [0, 1])
def test_a_rank_that_never_arrives_is_named_within_the_timeout(built, tmp_path, alone):
    """One rank of two started (its peer's node never came up). Bug caught: the run waiting for the
    missing rank until the job's time limit, or failing with torch's bare store timeout that names
    neither the rank nor its host."""
    env = stage_env() | {"RANK": str(alone), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(free_port()), "DSD_RANK_HOSTS": "node-a,node-b"}
    cmd = stage_argv("train", tiny_config("train.rendezvous_timeout_s=8"), *train_args(built, tmp_path / "run"))
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    if alone == 0:
        assert error and "1 of 2 ranks did not arrive within 8 s" in error[0] and "1 (node-b)" in error[0], proc.stderr[-2000:]
    else:
        assert error and "rank 1 on" in error[0] and "rank 0 is expected on node-a" in error[0], proc.stderr[-2000:]
    assert took < 8 + 90, took  # the timeout plus a rank's start (imports, model), not torch's 30 minutes
    assert "Traceback" not in proc.stderr
    assert os.environ.get("RANK") is None  # the test's own process untouched
