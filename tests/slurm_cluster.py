"""A real one-node Slurm cluster on this machine, for the Slurm tests.

Needs Debian's `slurmctld slurmd slurm-client munge` (`.ci/run` installs them) and root. Two fake
GPUs are character devices behind gres.conf, so GPU requests are scheduled as on a GPU node (the
jobs then find no CUDA and run on the CPU).

    python tests/slurm_cluster.py install | start | stop | status
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

CONF = Path("/etc/slurm/slurm.conf")  # where the jobstep plugin's srun finds it (SLURM_CONF is dropped)
GRES = Path("/etc/slurm/gres.conf")
FAKE_GPUS = [Path("/dev/fakegpu0"), Path("/dev/fakegpu1")]


PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
HEADER = "# Written by tests/slurm_cluster.py"


def available() -> str | None:
    """None if a cluster can be started here, else why not."""
    missing = [t for t in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(t)]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): apt-get install {' '.join(PACKAGES)}"
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    return None


def install() -> None:
    """Debian's Slurm and munge, if missing (seconds from the package mirror; needs root)."""
    if shutil.which("slurmctld") and shutil.which("munged") and shutil.which("sbatch"):
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"the Slurm tests need root to install {' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env)


def slurm_conf(host: str, cpus: int, mem_mb: int) -> str:
    return f"""{HEADER}: a one-node test cluster.
ClusterName=dsdtest
SlurmctldHost={host}
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
MinJobAge=600
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
KillWait=30
NodeName={host} CPUs={cpus} RealMemory={mem_mb} Gres=gpu:{len(FAKE_GPUS)} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def start() -> None:
    why = available()
    if why:
        raise RuntimeError(why)
    if CONF.exists() and not CONF.read_text().startswith(HEADER):
        raise RuntimeError(f"{CONF} is not this script's (a real cluster's?): not overwriting it")
    stop()
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 2
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    for d in ("/etc/slurm", "/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm", "/run/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
    for dev in FAKE_GPUS:
        if not dev.exists():
            subprocess.run(["mknod", str(dev), "c", "1", "3"], check=True)  # like /dev/null
    CONF.write_text(slurm_conf(host, cpus, mem_mb))
    GRES.write_text(f"NodeName={host} Name=gpu File=/dev/fakegpu[0-{len(FAKE_GPUS) - 1}]\n")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
    shutil.chown("/run/munge", "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    subprocess.run(["slurmctld"], check=True)
    subprocess.run(["slurmd"], check=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.strip()
        if state == "idle":
            return
        time.sleep(1)
    raise RuntimeError(f"the Slurm node did not become idle (state {state!r}); see /var/log/slurm/")


def stop() -> None:
    subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True)
    for daemon in ("slurmd", "slurmctld", "munged"):
        subprocess.run(["pkill", "-x", daemon], capture_output=True)
    for _ in range(50):
        if subprocess.run(["pgrep", "-x", "slurmd|slurmctld|munged"], capture_output=True).returncode != 0:
            break
        time.sleep(0.2)
    for d in ("/var/spool/slurmctld", "/var/spool/slurmd"):
        shutil.rmtree(d, ignore_errors=True)
    # Without a controller, a slurm.conf left behind makes every `scontrol show config` (which the
    # Snakemake Slurm plugin runs when it is imported, i.e. at every snakemake start) wait ~9 s.
    if CONF.exists() and CONF.read_text().startswith(HEADER):
        CONF.unlink()
        GRES.unlink(missing_ok=True)


if __name__ == "__main__":
    {"install": install, "start": start, "stop": stop, "status": lambda: print(available() or "ok")}[sys.argv[1]]()
