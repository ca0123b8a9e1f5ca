"""What the Snakefile needs to know about a Slurm submission when it reads the workflow.

Snakemake decides its executor after reading the Snakefile, so the command line is read here the
way Snakemake reads it (profiles included): `auto` settings for a Slurm run are chosen from
config.yaml's `slurm:` section, the same on the login node and inside the jobs (which run Snakemake
again with the slurm-jobstep executor), never from the login node's own hardware.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .config import ConfigError

SLURM_EXECUTORS = ("slurm", "slurm-jobstep")
# The SITE SETTINGS placeholders profiles/slurm/config.yaml ships with.
PLACEHOLDER_ACCOUNT = "my_account"


def snakemake_args(argv: list[str] | None = None):
    """Snakemake's own parse of this process's command line and profiles, or None (not the CLI)."""
    try:
        from snakemake.cli import parse_args

        with contextlib.redirect_stderr(io.StringIO()):  # it announces the profiles, as Snakemake did already
            return parse_args(sys.argv[1:] if argv is None else argv)[1]
    except (Exception, SystemExit):
        return None


def submits_to_slurm(argv: list[str] | None = None) -> bool:
    args = snakemake_args(argv)
    return getattr(args, "executor", None) in SLURM_EXECUTORS


def profile_settings(args) -> dict:
    """The keys of the profiles the command line names (later ones win), as their files have them."""
    import yaml
    from snakemake.cli import get_profile_dir

    merged: dict = {}
    for profile in getattr(args, "profile", None) or []:
        found = get_profile_dir(str(profile))
        if found:
            merged |= yaml.safe_load(Path(found[1]).read_text()) or {}
    return merged


def check_slurm_site(argv: list[str] | None = None) -> None:
    """The profile's SITE SETTINGS are this cluster's before any job is submitted: the placeholder
    account, or a partition or account Slurm does not know, would fail every job (and every retry)."""
    args = snakemake_args(argv)
    if args is None or getattr(args, "executor", None) != "slurm":
        return
    profile = profile_settings(args)
    resources = profile.get("default-resources") or {}
    if isinstance(resources, list):
        resources = dict(item.split("=", 1) for item in resources)
    no_account = profile.get("slurm-no-account") or getattr(args, "slurm_no_account", None) is True
    account = str(resources.get("slurm_account", "")).strip("'\"")
    where = "the Slurm profile (profiles/slurm/config.yaml, SITE SETTINGS)"
    if not no_account and account == PLACEHOLDER_ACCOUNT:
        raise ConfigError(f"{where}: slurm_account is still the placeholder {PLACEHOLDER_ACCOUNT!r}: set your "
                          f"cluster's account (sacctmgr show assoc user=$USER), or delete the line and set "
                          f"slurm-no-account: true")
    partition = str(resources.get("slurm_partition", "")).strip("'\"")
    known = slurm_list(["sinfo", "-h", "-o", "%P"])
    if partition and known is not None and partition not in {p.rstrip("*") for p in known}:
        raise ConfigError(f"{where}: slurm_partition {partition!r} is not a partition of this cluster "
                          f"(sinfo lists {', '.join(sorted(p.rstrip('*') for p in known))})")
    if account and not no_account:
        user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
        accounts = slurm_list(["sacctmgr", "-nP", "show", "assoc", f"user={user}", "format=account"])
        if accounts and account not in accounts:
            raise ConfigError(f"{where}: slurm_account {account!r} is not one of yours (sacctmgr lists "
                              f"{', '.join(sorted(set(accounts)))})")


def slurm_list(cmd: list[str]) -> list[str] | None:
    """A Slurm listing's lines, or None where the command is missing or fails (no accounting, say)."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return lines if proc.returncode == 0 and lines else None
