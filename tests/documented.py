"""The commands the docs show, collected, and a way to run one exactly as written.

A command is a line of a ```bash block in README.md or docs/*.md (continuation lines joined, a
trailing `# comment` dropped), a code span in their prose that starts with a program, or a comment
line of config.yaml, the Snakefile, profiles/*/config.yaml or config/*.yaml that does. Each must be run by
a test (tests/test_documented_commands.py registers which); a new one without a test fails the suite.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("snakemake", "make", "python", "python3", "pip", "source", "export")
COMMENTED = ["config.yaml", "Snakefile", "profiles/local/config.yaml", "profiles/slurm/config.yaml",
             "profiles/default/config.yaml", "config/small-data.yaml", "config/small-data-demo.yaml",
             # every card recipe, so that a new one's command is run by a test too
             *sorted(str(p.relative_to(REPO)) for p in (REPO / "config" / "cards").glob("*.yaml"))]
VENV_BIN = Path(sys.executable).parent


def DOC_PAGES() -> list[Path]:  # noqa: N802 (a constant that follows the docs folder)
    """README.md and every page under docs/ (the archived benchmarks are history, not commands)."""
    return [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md"))]


def documented_commands() -> dict[str, str]:
    """{command: "file:line" where it is first shown}."""
    found: dict[str, str] = {}

    def add(text: str, where: str) -> None:
        command = " ".join(text.split())
        if command == "export":  # the stage's name, not the shell builtin (which takes NAME=value)
            return
        if command.split(" ", 1)[0] in PROGRAMS:
            found.setdefault(command, where)

    for page in DOC_PAGES():
        in_block, pending = False, ""
        name = str(page.relative_to(REPO))
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_block = not in_block and line.strip() in ("```bash", "```sh")
                continue
            if not in_block:
                for span in re.findall(r"`([^`]+)`", line):
                    add(span, f"{name}:{n}")
                continue
            text = pending + line.strip()
            pending = text[:-1] if text.endswith("\\") else ""
            if not pending:
                add(re.split(r"\s{2,}#|^#", text)[0], f"{name}:{n}")
    for name in COMMENTED:
        pending = ""
        for n, line in enumerate((REPO / name).read_text().splitlines(), 1):
            comment = re.match(r"\s*#\s+(.*)", line)
            text = pending + comment.group(1).strip() if comment else ""
            pending = text[:-1] if text.endswith("\\") else ""
            if text and not pending:
                add(re.split(r"\s{2,}", text)[0], f"{name}:{n}")
    return found


def copy_repo(dst: Path) -> Path:
    """The checkout as a fresh clone has it (tracked and not-ignored files), links kept as links. A
    copy of the tree without its .git (the GPU machines get one): every file but what a run writes."""
    if not (REPO / ".git").exists():
        shutil.copytree(REPO, dst, symlinks=True, ignore=shutil.ignore_patterns(
            ".venv", "results", "resources", "logs", "benchmarks", ".snakemake", "wheelhouse", "__pycache__"))
        return dst
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout
    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "--null", "-T", "-", "-cf", "-"], cwd=REPO, input=files, check=True,
                   stdout=open(dst / ".repo.tar", "wb"))
    subprocess.run(["tar", "-xf", ".repo.tar"], cwd=dst, check=True)
    (dst / ".repo.tar").unlink()
    return dst


def fake_gpus(folder: Path, count: int, mib: int, name: str = "NVIDIA H100 80GB HBM3") -> Path:
    """A folder with an `nvidia-smi` that lists `count` GPUs of `mib` MiB, as the real one prints them
    (`-L`, and `--query-gpu=memory.total --format=csv,noheader,nounits`): the machine a dry-run of a
    GPU command resolves `auto` for. Returns the folder to put first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    listing = "\n".join(f"GPU {i}: {name} (UUID: GPU-{i})" for i in range(count))
    memory = "\n".join(str(mib) for _ in range(count))
    tool = folder / "nvidia-smi"
    tool.write_text(f'#!/bin/sh\ncase "$*" in\n  *memory.total*) printf "{memory}\\n" ;;\n  *) printf "{listing}\\n" ;;\nesac\n')
    tool.chmod(0o755)
    return folder


def user_env(path: list[Path] = ()) -> dict[str, str]:
    """The shell after `source .venv/bin/activate`: the venv's programs first on PATH (after `path`: a
    fake nvidia-smi, the machine a GPU command is dry-run for)."""
    # Nothing of the test runner's own: `make test` exports MAKEFLAGS/MAKELEVEL, which make a nested
    # make print "Entering directory" lines a user's shell does not.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SNAKEMAKE", "PYTEST", "MAKE", "MFLAGS")) and k != "MAKELEVEL"}
    env["PATH"] = os.pathsep.join([*map(str, path), str(VENV_BIN), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_documented(command: str, cwd: Path, *, replace: dict[str, str] | None = None, dry_run: bool = False,
                   timeout: int = 900, wait: bool = True, path: list[Path] = (), append: str = ""):
    """`command` typed in a shell at `cwd`; placeholder paths replaced by real ones and nothing else
    changed, except `-n -p` appended for a dry-run of a command too long to run here (or `append`, a
    lower step count for a CPU run of a GPU command). `path`: folders put first on PATH (fake GPUs)."""
    line = command
    for placeholder, real in (replace or {}).items():
        assert placeholder in line, f"{placeholder!r} is not in {command!r}"
        line = line.replace(placeholder, real)
    if append:
        line += " " + append
    if dry_run:
        line += " -n -p"
    env = user_env(path)
    if not wait:
        return subprocess.Popen(["bash", "-c", line], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def jobs(proc: subprocess.CompletedProcess) -> set[str]:
    """The rules of the jobs a (dry-)run lists (a real run logs them to stderr)."""
    return {line.split("rule ")[1].rstrip(":") for line in (proc.stdout + (proc.stderr or "")).splitlines()
            if line.lstrip().startswith(("rule ", "localrule "))}


def stage_configs(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    """{stage: the --config JSON its shell command passes} from `snakemake -n -p` output."""
    found = {}
    for stage, quoted in re.findall(r"-m workflow\.(\w+) --config ('(?:[^']|'\"'\"')*'|\S+)", proc.stdout):
        found[stage] = json.loads(shlex.split(quoted)[0])
    return found


def shell_commands(proc: subprocess.CompletedProcess, stage: str) -> list[str]:
    return [line for line in proc.stdout.splitlines() if f"-m workflow.{stage} " in line]
