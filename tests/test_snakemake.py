"""The whole DAG through Snakemake on the tiny config, in a scratch working directory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_OVERRIDES, stage_env
from workflow.config import Config

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(workdir: Path, *args: str, overrides=TINY_OVERRIDES) -> subprocess.CompletedProcess:
    # Snakemake's --config keys must be identifiers, so `train.steps=4` is written `train__steps=4`.
    config = [key.replace(".", "__") + "=" + value for key, value in (o.split("=", 1) for o in overrides)]
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(REPO / "config.yaml"), "--cores", "2", *args]
    if config:
        cmd += ["--config", *config]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=stage_env())


def jobs_planned(proc: subprocess.CompletedProcess) -> set[str]:
    return {line.split("rule ")[1].rstrip(":") for line in proc.stdout.splitlines() if line.lstrip().startswith(("rule ", "localrule "))}


def test_dry_run_shows_every_stage(tmp_path):
    proc = snakemake(tmp_path, "-n")
    assert proc.returncode == 0, proc.stderr
    assert jobs_planned(proc) == {"prepare", "fetch_model", "cache", "train", "ema", "sample", "report_files", "all"}
    assert not (tmp_path / "results").exists()


def test_bad_config_fails_naming_the_key(tmp_path):
    proc = snakemake(tmp_path, "-n", overrides=TINY_OVERRIDES + ["train.zero_stage=7", "train.bogus=1"])
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "train.zero_stage" in out and "train.bogus: unknown key" in out


@pytest.mark.slow
def test_default_config_learns_then_reruns_only_what_changed(tmp_path):
    """The embedded default (config.yaml as shipped) must reach digit_accuracy >= 0.90. On the same
    results, a config change reruns only the stages it touches, and a forced train resumes."""
    proc = snakemake(tmp_path, overrides=[])
    assert proc.returncode == 0, proc.stderr[-5000:]
    run = tmp_path / "results" / "runs" / "digits-tiny"
    metrics = json.loads((run / "samples" / "metrics.json").read_text())
    assert metrics["images"] == 100 and metrics["digit_images_scored"] == 100
    assert metrics["digit_accuracy"] >= 0.90, metrics
    assert (run / "samples" / "grid.png").is_file()
    assert (run / "model" / "model_index.json").is_file()
    assert (tmp_path / "logs" / "digits-tiny" / "train.log").is_file()
    assert (tmp_path / "benchmarks" / "digits-tiny" / "train.tsv").is_file()

    report = snakemake(tmp_path, "--report", "report.html", overrides=[])
    assert report.returncode == 0, report.stderr[-3000:]
    page = (tmp_path / "report.html").read_text(errors="replace")
    for name in ("grid.png", "training.png", "metrics.html", "config.yaml"):
        assert name in page, name

    nothing = snakemake(tmp_path, "-n", overrides=[])
    assert nothing.returncode == 0 and jobs_planned(nothing) == set(), nothing.stdout

    steps = Config().train.steps
    more_steps = [f"train.steps={steps + 2}"]
    # A training change reruns training and what follows it, never the data or the cache.
    changed = snakemake(tmp_path, "-n", overrides=more_steps)
    assert jobs_planned(changed) == {"train", "ema", "sample", "report_files", "all"}, changed.stdout
    # A merge-only change reruns the merge and what follows, not training.
    merge_only = snakemake(tmp_path, "-n", overrides=["ema.use=false"])
    assert jobs_planned(merge_only) == {"ema", "sample", "report_files", "all"}, merge_only.stdout

    # Forcing one stage reruns it; train resumes from its checkpoint instead of starting over.
    forced = snakemake(tmp_path, "--forcerun", "train", overrides=more_steps)
    assert forced.returncode == 0, forced.stderr[-5000:]
    result = json.loads((run / "train.json").read_text())
    assert result["resumed_from"] == steps and result["final_step"] == steps + 2
