"""The commands the docs show, collected, and a way to run one exactly as written.

A command is a line of a ```bash block in README.md (continuation lines joined, a trailing
`# comment` dropped), a code span in README.md's prose that starts with a program, or a comment line
of config.yaml, the Snakefile, profiles/*/config.yaml or config/*.yaml that does. Each must be run by
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
             "config/gpu.yaml", "config/one-gpu.yaml", "config/sdxl.yaml", "config/small-data.yaml",
             "config/small-data-demo.yaml",
             # every card recipe, so that a new one's command is run by a test too
             *sorted(str(p.relative_to(REPO)) for p in (REPO / "config" / "cards").glob("*.yaml"))]
VENV_BIN = Path(sys.executable).parent


def documented_commands() -> dict[str, str]:
    """{command: "file:line" where it is first shown}."""
    found: dict[str, str] = {}

    def add(text: str, where: str) -> None:
        command = " ".join(text.split())
        if command == "export":  # the stage's name, not the shell builtin (which takes NAME=value)
            return
        if command.split(" ", 1)[0] in PROGRAMS:
            found.setdefault(command, where)

    in_block, pending = False, ""
    for n, line in enumerate((REPO / "README.md").read_text().splitlines(), 1):
        if line.startswith("```"):
            in_block = not in_block and line.strip() in ("```bash", "```sh")
            continue
        if not in_block:
            for span in re.findall(r"`([^`]+)`", line):
                add(span, f"README.md:{n}")
            continue
        text = pending + line.strip()
        pending = text[:-1] if text.endswith("\\") else ""
        if not pending:
            add(re.split(r"\s{2,}#|^#", text)[0], f"README.md:{n}")
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


def user_env() -> dict[str, str]:
    """The shell after `source .venv/bin/activate`: the venv's programs first on PATH."""
    # Nothing of the test runner's own: `make test` exports MAKEFLAGS/MAKELEVEL, which make a nested
    # make print "Entering directory" lines a user's shell does not.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SNAKEMAKE", "PYTEST", "MAKE", "MFLAGS")) and k != "MAKELEVEL"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_documented(command: str, cwd: Path, *, replace: dict[str, str] | None = None, dry_run: bool = False,
                   timeout: int = 900, wait: bool = True):
    """`command` typed in a shell at `cwd`; placeholder paths replaced by real ones and nothing else
    changed, except `-n -p` appended for a dry-run of a command too long to run here."""
    line = command
    for placeholder, real in (replace or {}).items():
        assert placeholder in line, f"{placeholder!r} is not in {command!r}"
        line = line.replace(placeholder, real)
    if dry_run:
        line += " -n -p"
    if not wait:
        return subprocess.Popen(["bash", "-c", line], cwd=cwd, env=user_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=user_env(), capture_output=True, text=True,
                          timeout=timeout)


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
