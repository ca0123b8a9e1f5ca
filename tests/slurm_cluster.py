"""A real two-node Slurm cluster on this machine, for the Slurm tests.

Each node is a slurmd in a network namespace and UTS namespace of its own (host name dsd-node1,
dsd-node2; addresses on a bridge, 10.213.7.0/24, that only these namespaces and the controller
share), so srun tasks, the rendezvous and gloo's traffic cross between hosts as on a cluster. One
slurmctld (at the bridge's address) and munge run in the machine's own namespaces;
the filesystem is the machine's, shared by every node as a cluster's shared filesystem would be.
Names resolve through /etc/hosts lines this script adds and removes. Two fake GPUs per node are
character devices behind gres.conf, so GPU requests are scheduled as on GPU nodes (the jobs then
find no CUDA and run on the CPU). Needs Debian's `slurmctld slurmd slurm-client munge` (`.ci/run`
installs them), iproute2 and root.

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
HOSTS = Path("/etc/hosts")
FAKE_GPUS = [Path("/dev/fakegpu0"), Path("/dev/fakegpu1")]
NODES = ["dsd-node1", "dsd-node2"]
CONTROLLER = socket.gethostname().split(".")[0]  # slurmctld checks that it runs on SlurmctldHost
SUBNET = "10.213.7"  # the test cluster's own bridge: traffic only between namespaces made here
BRIDGE = "dsdbr0"
ADDRESSES = {CONTROLLER: f"{SUBNET}.1"} | {node: f"{SUBNET}.{11 + i}" for i, node in enumerate(NODES)}


PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "iproute2"]
HEADER = "# Written by tests/slurm_cluster.py"


def available() -> str | None:
    """None if a cluster can be started here, else why not."""
    missing = [t for t in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(t)]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): apt-get install {' '.join(PACKAGES)}"
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    if not shutil.which("ip") or not shutil.which("nsenter"):
        return "the test nodes need iproute2 (ip) and util-linux (nsenter)"
    return None


def install() -> None:
    """Debian's Slurm, munge and iproute2, if missing (seconds from the package mirror; needs root)."""
    if all(shutil.which(tool) for tool in ("slurmctld", "munged", "sbatch", "ip")):
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"the Slurm tests need root to install {' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env)


def slurm_conf(cpus: int, mem_mb: int) -> str:
    nodes = "\n".join(f"NodeName={n} NodeAddr={ADDRESSES[n]} CPUs={cpus} RealMemory={mem_mb} Gres=gpu:{len(FAKE_GPUS)} "
                      f"State=UNKNOWN" for n in NODES)
    return f"""{HEADER}: a two-node test cluster.
ClusterName=dsdtest
SlurmctldHost={CONTROLLER}({ADDRESSES[CONTROLLER]})
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
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
KillWait=30
SlurmdTimeout=20
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def network_up() -> None:
    """The bridge (the controller's address) and one namespace per node, each with a veth on it."""
    def ip(*args: str, ns: str | None = None) -> None:
        subprocess.run(["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args], check=True, capture_output=True)

    ip("link", "add", BRIDGE, "type", "bridge")
    ip("addr", "add", f"{ADDRESSES[CONTROLLER]}/24", "dev", BRIDGE)
    ip("link", "set", BRIDGE, "up")
    for i, node in enumerate(NODES):
        ip("netns", "add", node)
        ip("link", "add", f"veth-dsd{i}", "type", "veth", "peer", "name", "eth0", "netns", node)
        ip("link", "set", f"veth-dsd{i}", "master", BRIDGE)
        ip("link", "set", f"veth-dsd{i}", "up")
        ip("addr", "add", f"{ADDRESSES[node]}/24", "dev", "eth0", ns=node)
        ip("link", "set", "eth0", "up", ns=node)
        ip("link", "set", "lo", "up", ns=node)


def network_down() -> None:
    for node in NODES:
        subprocess.run(["ip", "netns", "del", node], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def on_node(node: str, *cmd: str) -> list[str]:
    """`cmd` as run on `node`: in its network namespace, with its host name."""
    return ["nsenter", f"--net=/run/netns/{node}", "unshare", "--uts", "--", "sh", "-c",
            f'hostname {node} && exec "$@"', "sh", *cmd]


def node_pids(node: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def lose_node(node: str) -> None:
    """The node is gone: its slurmd and every process on it (the job's ranks there) killed at once."""
    for pid in node_pids(node):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def restore_node(node: str) -> None:
    """The lost node back (its slurmd started again) and returned to service."""
    subprocess.run(on_node(node, "slurmd"), check=True)
    wait_for_nodes(lambda states: states.get(node) not in (None, "down", "down*"), f"{node} to register again")
    subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], capture_output=True)
    wait_for_nodes(lambda states: states.get(node) == "idle", f"{node} to be idle")


def node_states() -> dict[str, str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True).stdout
    return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)


def wait_for_nodes(ok, what: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ok(node_states()):
            return
        time.sleep(1)
    raise RuntimeError(f"timed out waiting for {what} (nodes: {node_states()}); see /var/log/slurm/")


def hosts_lines() -> str:
    return "".join(f"{ADDRESSES[node]} {node}  {HEADER}\n" for node in NODES)


def set_hosts(present: bool) -> None:
    kept = [line for line in HOSTS.read_text().splitlines(keepends=True) if HEADER not in line]
    HOSTS.write_text("".join(kept) + (hosts_lines() if present else ""))


def start() -> None:
    why = available()
    if why:
        raise RuntimeError(why)
    if CONF.exists() and not CONF.read_text().startswith(HEADER):
        raise RuntimeError(f"{CONF} is not this script's (a real cluster's?): not overwriting it")
    stop()
    cpus = os.cpu_count() or 2  # each node offers the machine's cores: the nodes share them
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8 / len(NODES))
    for d in ("/etc/slurm", "/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm", "/run/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
    for dev in FAKE_GPUS:
        if not dev.exists():
            subprocess.run(["mknod", str(dev), "c", "1", "3"], check=True)  # like /dev/null
    network_up()
    set_hosts(True)
    CONF.write_text(slurm_conf(cpus, mem_mb))
    GRES.write_text(f"NodeName={','.join(NODES)} Name=gpu File=/dev/fakegpu[0-{len(FAKE_GPUS) - 1}]\n")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
    shutil.chown("/run/munge", "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    subprocess.run(["slurmctld"], check=True)
    for node in NODES:
        subprocess.run(on_node(node, "slurmd"), check=True)
    wait_for_nodes(lambda states: sorted(states) == NODES and set(states.values()) == {"idle"}, "both nodes to be idle", 60)


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
    for node in NODES if Path("/run/netns").is_dir() else []:
        if node in os.listdir("/run/netns"):
            lose_node(node)  # a job's processes left on a node
    network_down()
    if HOSTS.is_file():
        set_hosts(False)
    # Without a controller, a slurm.conf left behind makes every `scontrol show config` (which the
    # Snakemake Slurm plugin runs when it is imported, i.e. at every snakemake start) wait ~9 s.
    if CONF.exists() and CONF.read_text().startswith(HEADER):
        CONF.unlink()
        GRES.unlink(missing_ok=True)


if __name__ == "__main__":
    {"install": install, "start": start, "stop": stop, "status": lambda: print(available() or "ok")}[sys.argv[1]]()
