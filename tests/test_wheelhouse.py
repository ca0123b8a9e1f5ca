"""The wheelhouse brings everything a node with only PyTorch and numpy needs (`make test-wheelhouse`,
run by hand: not in .ci/run, for CI time).

Bug this catches: a GPU node where, after `make wheelhouse` and the README's install line,
`snakemake` did not exist (the wheelhouse held the stages' libraries but not snakemake, its Slurm
plugin or datasets). Here the README's lines run as written, from a copy of the repo, against a
fresh venv that has only torch and numpy: `make wheelhouse WHEEL_PYTHON=3.11` (this machine's
Python; the GPU image's is 3.12, which `make wheelhouse` targets and which is checked file by file),
the install line, the export line, then the whole workflow. Needs PyPI (as `make wheelhouse` does).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from documented import REPO, copy_repo, fake_gpus, jobs, run_documented, stage_configs, user_env

pytestmark = pytest.mark.wheelhouse


def repo_with_venv(dst: Path) -> Path:
    """A copy of the repo using the project's .venv (files keep their times, so make sees it installed)."""
    repo = copy_repo(dst)
    (repo / ".venv").symlink_to(REPO / ".venv")
    return repo


def wheel_name(requirement: str) -> str:
    name, version = requirement.split("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def test_wheelhouse_for_python_312_has_every_package(tmp_path):
    repo = repo_with_venv(tmp_path / "repo")
    proc = run_documented("make wheelhouse", repo, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wanted = (repo / "wheelhouse" / "requirements.txt").read_text().split()
    wheels = [p.name.lower() for p in (repo / "wheelhouse").glob("*.whl")]
    missing = [r for r in wanted if not any(w.startswith(wheel_name(r)) for w in wheels)]
    assert not missing, missing
    assert len(wheels) == len(wanted)  # one wheel per package: two versions would stop the install
    names = {r.split("==")[0] for r in wanted}
    assert {"snakemake", "snakemake-executor-plugin-slurm", "datasets", "deepspeed", "diffusers"} <= names
    assert not names & {"torch", "numpy", "nvidia-cublas-cu12", "triton"}  # the node's image has these
    assert all(re.search(r"-(cp312|py3|py2\.py3|cp3\d+-abi3|py312)", w) for w in wheels), wheels


def test_bare_node_runs_the_workflow_from_the_wheelhouse(tmp_path):
    repo = repo_with_venv(tmp_path / "repo")
    made = run_documented("make wheelhouse WHEEL_PYTHON=3.11", repo, timeout=1200)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    (repo / ".venv").unlink()  # the node has no project venv

    node = tmp_path / "node"  # the GPU image: python with torch and numpy, nothing else
    subprocess.run([sys.executable, "-m", "venv", str(node)], check=True)  # a venv of the base Python: bare
    pins = [line for line in (REPO / "pyproject.toml").read_text().split('"') if line.startswith(("torch==", "numpy=="))]
    subprocess.run([str(node / "bin" / "pip"), "install", "--quiet", *pins], check=True, timeout=900)

    site = tmp_path / "site"
    env = user_env() | {"PATH": f"{node / 'bin'}:/usr/bin:/bin", "VIRTUAL_ENV": str(node)}
    env.pop("PYTHONPATH", None)

    def on_node(command: str, **kw):
        line = command.replace("<dir>", str(site))
        return subprocess.run(["bash", "-c", line + kw.pop("then", "")], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=kw.pop("timeout", 1200))

    install = on_node("python3 -m pip install --no-index --no-deps --target <dir> wheelhouse/*.whl")
    assert install.returncode == 0, install.stderr[-3000:]
    export = "export PYTHONPATH=<dir> PATH=<dir>/bin:$PATH"
    where = on_node(export, then="; command -v snakemake; python -c 'import torch, numpy; print(torch.__file__)'")
    assert where.stdout.split()[0] == str(site / "bin" / "snakemake"), where.stdout + where.stderr
    assert str(node) in where.stdout.split()[1]  # torch is the node's own

    # docs/gpus.md's node line, dry-run on a node with one GPU (an nvidia-smi that lists one)
    gpu = on_node(export, then=f"; PATH={fake_gpus(tmp_path / 'gpu', 1, 81559)}:$PATH snakemake --cores all --config -n -p")
    assert gpu.returncode == 0 and jobs(gpu) >= {"train", "ema", "sample"}, gpu.stdout[-2000:] + gpu.stderr[-3000:]
    assert stage_configs(gpu)["train"]["train"]["precision"] == "bf16-mixed"

    cfg = yaml.safe_load((repo / "config.yaml").read_text())  # a short run: every stage for real
    cfg["model"]["tiny"]["vae_steps"] = 5
    cfg["train"] |= {"steps": 4, "micro_batch": 8}
    cfg["sample"] |= {"seeds": [0], "steps": 2}
    (repo / "config.yaml").write_text(yaml.safe_dump(cfg))
    full = on_node(export, then="; snakemake --cores all")
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-5000:]
    run = repo / "results" / "runs" / "digits-tiny"
    assert json.loads((run / "train.json").read_text())["final_step"] == 4
    assert json.loads((run / "samples" / "metrics.json").read_text())["images"] == 10
    assert (run / "report" / "training.png").is_file()
