"""Shared fixtures: a tiny but real pipeline (digits -> builtin:tiny -> latents), built once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from workflow.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds per stage on 2 CPU cores, large enough to exercise every code path.
TINY_OVERRIDES = [
    "model.tiny.vae_steps=5",
    "data.shard_size=700",  # 1797 digits -> 3 shards (so ranks and shard order matter)
    "train.steps=4",
    "train.micro_batch=8",
    "train.procs=2",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.warmup_steps=2",
    "sample.prompts=['a handwritten digit 3', 'a handwritten digit 7']",
    "sample.seeds=[0, 1]",
    "sample.steps=2",
]


def tiny_config(*extra: str) -> Config:
    return load_config(REPO / "config.yaml", TINY_OVERRIDES + list(extra))


def run_stage(stage: str, cfg: Config, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m workflow.<stage>` exactly as the rules call it."""
    cmd = [sys.executable, "-m", f"workflow.{stage}", "--config", json.dumps(cfg.model_dump(mode="json")), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=stage_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{stage} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, Path]:
    """prepare -> fetch_model -> cache on the tiny config, shared by the stage tests."""
    root = tmp_path_factory.mktemp("built")
    cfg = tiny_config()
    paths = {"data": root / "data", "model": root / "model", "latents": root / "latents", "root": root}
    run_stage("prepare", cfg, "--out", str(paths["data"]))
    run_stage("fetch_model", cfg, "--data", str(paths["data"]), "--out", str(paths["model"]))
    run_stage("cache", cfg, "--data", str(paths["data"]), "--model", str(paths["model"]), "--out", str(paths["latents"]))
    return paths


# ---------------------------------------------------------------- fault ledger (tests/faults)
# Every fault test records what it injected and whether anything was lost; the session ends by
# printing the totals.


@dataclass
class Ledger:
    rows: list[tuple[str, bool, int]] = field(default_factory=list)

    def record(self, fault: str, survived: bool, data_lost: int = 0) -> None:
        self.rows.append((fault, survived, data_lost))


LEDGER = Ledger()


@pytest.fixture
def ledger() -> Ledger:
    return LEDGER


def pytest_terminal_summary(terminalreporter):
    if not LEDGER.rows:
        return
    write = terminalreporter.write_line
    write("")
    write("fault injection: fault | survived | data lost")
    for fault, survived, lost in LEDGER.rows:
        write(f"  {fault} | {'yes' if survived else 'NO'} | {lost}")
    injected = len(LEDGER.rows)
    survived = sum(1 for _, ok, _ in LEDGER.rows if ok)
    lost = sum(n for _, _, n in LEDGER.rows)
    write(f"faults injected: {injected}, survived: {survived}, data lost: {lost}")
