"""A real two-node SLURM cluster on this one machine, for tests.

One slurmctld and two slurmd (`node1`, `node2`, both 127.0.0.1, each on its own port with its own spool dir, pid file
and log), plus a private munged, all started from Debian's `slurm-wlm` and `munge` packages and all owned by one
directory. Nothing here touches a system-wide SLURM or munge set-up: the daemons read `<dir>/slurm.conf` (clients
find it through `SLURM_CONF`), munged listens on `<dir>/munge/munge.socket` with its own key, and `stop` ends exactly
the processes `start` recorded in `<dir>/pids.json`, by pid.

Two machine-wide changes are made, once, because SLURM cannot work without them:
- `apt-get install slurm-wlm munge` when `slurmctld` is missing (root, non-interactive);
- `127.0.0.1 node1 node2` is appended to /etc/hosts when the names do not resolve: slurmd and srun look node
  names up even when `NodeAddr` is given.

    python tests/slurm/cluster.py start  --dir /tmp/mona-slurm
    python tests/slurm/cluster.py status --dir /tmp/mona-slurm
    python tests/slurm/cluster.py stop   --dir /tmp/mona-slurm
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

NODES = ("node1", "node2")
PARTITION = "debug"
# Declared, not real: the production #SBATCH defaults (one task per GPU, 8 CPUs each) must fit a node unmodified.
# task/none binds nothing, so the number is bookkeeping only; tests keep OMP_NUM_THREADS=1.
CPUS_PER_NODE = 8
REAL_MEMORY_MB = 2000
_RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class ClusterUnavailable(RuntimeError):
    """SLURM could not be installed (no apt, no network): callers may skip, everything else is a failure."""


@dataclass(frozen=True)
class SlurmCluster:
    """A started cluster: where it lives and the environment that points SLURM's client commands at it."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """os.environ pointed at this cluster, for sbatch/squeue/scontrol/scancel.

        Variables of an enclosing job (SLURM_*, torch's RANK/WORLD_SIZE/...) are dropped: sbatch exports the
        submitting environment into the job, where they would describe the wrong job.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
               and k not in _RANK_VARS}
        return env | {"SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        """Run one SLURM client command against this cluster and return its output as text."""
        return subprocess.run(
            list(args), env=kw.pop("env", self.env), check=check, timeout=timeout, capture_output=True, text=True, **kw
        )

    def sbatch_wait(self, script: str | Path, *flags: str, env: dict[str, str] | None = None,
                    cwd: str | Path | None = None, timeout: float = 300) -> tuple[int, int]:
        """`sbatch --wait --parsable [flags] script`: (job id, sbatch's exit status = the job's) once it ended.

        A job still running after `timeout` seconds is cancelled and TimeoutError raised.
        """
        cmd = ["sbatch", "--wait", "--parsable", *flags, str(script)]
        proc = subprocess.Popen(cmd, env=env or self.env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            for job in out.split():
                self.run("scancel", job.split(";")[0], check=False)
            raise TimeoutError(f"{' '.join(cmd)} still waiting after {timeout} s (cancelled)") from None
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()}")
        return int(job_id), proc.returncode

    def job_fields(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as key -> value (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False).stdout
        return dict(line.split(None, 1) for line in out.splitlines() if line.strip())


def _log(msg: str) -> None:
    print(f"[slurm-cluster] {msg}", file=sys.stderr, flush=True)


def ensure_installed() -> None:
    """apt-get the daemons when missing; raise ClusterUnavailable only when apt itself cannot deliver them."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise ClusterUnavailable("slurm-wlm/munge are not installed and apt-get (as root) is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _log("installing slurm-wlm and munge with apt-get")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                                              "slurm-wlm", "munge"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            raise ClusterUnavailable(f"`{' '.join(cmd)}` failed: {tail[0]}")
    if not shutil.which("slurmctld"):
        raise ClusterUnavailable("apt-get reported success but slurmctld is still missing")


def ensure_hosts() -> None:
    """Make node1/node2 resolve to 127.0.0.1 (appends one line to /etc/hosts when they do not)."""
    missing = []
    for node in NODES:
        try:
            socket.gethostbyname(node)
        except OSError:
            missing.append(node)
    if missing:
        _log(f"adding '127.0.0.1 {' '.join(missing)}' to /etc/hosts")
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # mona-dist test SLURM cluster (tests/slurm/cluster.py)\n")


def _free_ports(n: int) -> list[int]:
    """n distinct ports the kernel considers free right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_conf(root: Path, ctld_port: int, node_ports: list[int], bind_cpus: bool = False) -> Path:
    """`bind_cpus`: the machine's real CPUs and task/affinity, which binds each task to the CPUs its step gives it
    (as clusters do); otherwise 8 declared CPUs and task/none."""
    host = socket.gethostname().split(".")[0]  # slurmctld only starts where its own short name matches
    cpus = len(os.sched_getaffinity(0)) if bind_cpus else CPUS_PER_NODE
    nodes = "\n".join(
        f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} Boards=1 "
        f"SocketsPerBoard=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={REAL_MEMORY_MB} State=UNKNOWN"
        for n, p in zip(NODES, node_ports)
    )
    conf = f"""\
# Written by tests/slurm/cluster.py: one slurmctld and two slurmd on this machine, CPU only.
ClusterName=monatest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdSpoolDir={root}/spool/%n
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers/VMs here: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin={'task/affinity' if bind_cpus else 'task/none'}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Test jobs last seconds: look at pending (e.g. just requeued) jobs every 2 s instead of every 30-60 s.
SchedulerParameters=bf_interval=2,sched_interval=2
SlurmdParameters=config_overrides
GresTypes=gpu
JobRequeue=1
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=600
SlurmdTimeout=60
Waittime=0
{nodes}
PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
    path = root / "slurm.conf"
    path.write_text(conf)
    return path


def _start_munged(root: Path) -> int:
    mdir = root / "munge"
    mdir.mkdir(parents=True, exist_ok=True)
    os.chmod(mdir, 0o755)  # munged wants its socket's directory searchable by all; the key itself is 0600
    key = mdir / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)
    # --force: munged wants every directory above its socket searchable by all users, and pytest's temp dirs are
    # 0700. Every client here is root, so that check would only refuse a working set-up (it stays a warning).
    proc = subprocess.Popen(
        ["munged", "--foreground", "--force", f"--socket={mdir}/munge.socket", f"--key-file={key}",
         f"--pid-file={mdir}/munged.pid", f"--log-file={mdir}/munged.log", f"--seed-file={mdir}/munged.seed"],
        stdout=open(mdir / "munged.out", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    _wait_for(lambda: (mdir / "munge.socket").exists(), 20, "munged socket", proc, mdir / "munged.out")
    return proc.pid


def _wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"timed out waiting for {what}" + (f"; log tail:\n{tail}" if tail else ""))


def _daemon(root: Path, name: str, argv: list[str]) -> int:
    out = open(root / "log" / f"{name}.out", "ab")
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True).pid


def start(root: str | Path, timeout: float = 90, bind_cpus: bool = False) -> SlurmCluster:
    """Install if needed, write the config, start munged + slurmctld + 2 slurmd, wait until both nodes are idle.
    `bind_cpus`: see `write_conf`."""
    root = Path(root).resolve()
    ensure_installed()
    ensure_hosts()
    if _alive_pids(root):
        stop(root)
    for sub in ("state", "log"):  # a fresh controller: no jobs or log lines left from an earlier run
        shutil.rmtree(root / sub, ignore_errors=True)
    for sub in ("state", "run", "log", *(f"spool/{n}" for n in NODES)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ports = _free_ports(1 + len(NODES))
    conf = write_conf(root, ports[0], ports[1:], bind_cpus)
    pids: dict[str, int] = {}
    try:
        pids["munged"] = _start_munged(root)
        _save_pids(root, pids)
        pids["slurmctld"] = _daemon(root, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)])
        _save_pids(root, pids)
        cluster = SlurmCluster(root)
        _wait_for(lambda: cluster.run("scontrol", "ping", check=False).returncode == 0, timeout, "slurmctld",
                  log=root / "log" / "slurmctld.log")
        for node in NODES:
            pids[f"slurmd-{node}"] = _daemon(root, f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(conf)])
        _save_pids(root, pids)
        _wait_for(lambda: set(cluster.node_states().values()) == {"idle"}
                  and len(cluster.node_states()) == len(NODES), timeout, "both nodes idle",
                  log=root / "log" / "slurmd-node1.log")
    except BaseException:
        stop(root)
        raise
    _log(f"up: {cluster.node_states()} (SLURM_CONF={conf})")
    return cluster


def _save_pids(root: Path, pids: dict[str, int]) -> None:
    (root / "pids.json").write_text(json.dumps(pids, indent=1))


def _ours(pid: int, name: str) -> bool:
    """True when pid is still the daemon we started (guards against pid reuse)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmd) and Path(cmd[0].decode(errors="replace")).name == name.split("-")[0]


def _alive_pids(root: Path) -> dict[str, int]:
    try:
        pids = json.loads((root / "pids.json").read_text())
    except (OSError, ValueError):
        return {}
    return {name: pid for name, pid in pids.items() if _ours(pid, name)}


def stop(root: str | Path, grace: float = 10) -> list[str]:
    """SIGTERM each recorded daemon by pid (slurmd first, munged last), SIGKILL what outlives `grace`."""
    root = Path(root).resolve()
    order = sorted(_alive_pids(root).items(), key=lambda kv: ("slurmd" not in kv[0], kv[0] == "munged"))
    for name, pid in order:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while _ours(pid, name) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.2)
        if _ours(pid, name):
            os.kill(pid, signal.SIGKILL)
            _reap(pid)
    (root / "pids.json").unlink(missing_ok=True)
    return [name for name, _ in order]


def _reap(pid: int) -> None:
    """Collect a zombie when the daemon is our own child (the in-process pytest fixture case)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def status(root: str | Path) -> dict:
    root = Path(root).resolve()
    alive = _alive_pids(root)
    nodes = SlurmCluster(root).node_states() if "slurmctld" in alive else {}
    return {"dir": str(root), "daemons": alive, "nodes": nodes, "SLURM_CONF": str(root / "slurm.conf")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", required=True, help="directory owning config, state, logs and pid files")
    args = parser.parse_args(argv)
    if args.action == "start":
        try:
            cluster = start(args.dir)
        except ClusterUnavailable as err:
            print(f"cluster.py start: error: {err}", file=sys.stderr)
            return 2
        print(f"export SLURM_CONF={cluster.conf}")
    elif args.action == "stop":
        print("stopped: " + (", ".join(stop(args.dir)) or "nothing was running"))
    else:
        print(json.dumps(status(args.dir), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
