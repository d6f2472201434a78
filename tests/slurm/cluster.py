"""A real, private Slurm cluster on this host, for tests (Debian 12, root, no systemd).

`LocalSlurm(base, nodes=["n1", "n2"])` writes slurm.conf/gres.conf under `base`, starts munged (only if no working
munged is found), slurmctld and one slurmd per node name. `stop()` cancels leftover jobs, stops the daemons by the
PIDs it recorded at start, then any process that carries this cluster's SLURM_CONF (orphaned slurmstepds, job tasks),
again by PID; nothing is ever killed by name. Node names other than
"localhost" are faked on 127.0.0.1 (one slurmd per name on its own port) and added to /etc/hosts only if they do not
resolve; the original /etc/hosts is restored on stop. Each node gets `gpus_per_node` fake GPUs: /dev/null symlinks,
which Slurm accepts as device files, so `--gres=gpu:N` jobs schedule and get CUDA_VISIBLE_DEVICES.

Ports are picked free at start (slurmctld, and one slurmd port per node), so a stray cluster on 6817/6818 does not
interfere; still, run one of these at a time (each slurmd adds CPU load and the tests are timing-sensitive).
"""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from fewstep_testing import free_ports, system_packages_missing

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "shellcheck"]
BINARIES = ["/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch", "/usr/sbin/munged", "/usr/bin/shellcheck"]
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_PIDFILE = Path("/run/munge/munged.pid")
HOSTS = Path("/etc/hosts")


def why_unavailable():
    """None if a cluster can be started here, installing the Debian packages first if needed; else why not (not
    root, or Slurm missing and no apt-get). A failing apt-get raises: that is a broken machine, not a skip."""
    if os.geteuid() != 0:
        return "local Slurm cluster tests need root (they start munged, slurmctld and slurmd)"
    return system_packages_missing(PACKAGES, BINARIES)


def _resolves(name):
    return subprocess.run(["getent", "hosts", name], capture_output=True).returncode == 0


def _stop_pids(pids, timeout=10.0):
    """SIGTERM each PID, wait until all are gone, SIGKILL what is left after `timeout` seconds."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.05)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid):
    """True while `pid` runs. Daemons double-fork, so they are not our children to reap; a zombie counts as gone
    (an init that does not reap, as in some containers, leaves exited daemons as zombies)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # the state letter follows the parenthesised command name


def parse_show(text):
    """Parse `scontrol show job -o` output (one line of Key=Value pairs) into a dict of strings."""
    out = {}
    for tok in text.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = v
    return out


class LocalSlurm:
    """A private Slurm cluster rooted at `base` (see the module docstring); a context manager, or start()/stop()."""

    def __init__(self, base, nodes=("n1", "n2"), cpus_per_node=8, gpus_per_node=2, mem_mb=16000, cred_expire=5):
        self.base = Path(base).resolve()
        self.nodes = list(nodes)
        self.cpus, self.gpus, self.mem, self.cred_expire = cpus_per_node, gpus_per_node, mem_mb, cred_expire
        self.conf = self.base / "etc" / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._pids = []            # daemons we started, in start order
        self._hosts_backup = None  # original /etc/hosts text, if we changed it

    # ---- configuration -------------------------------------------------------------------------------------------
    def _write_config(self):
        b = self.base
        for d in ("etc", "log", "run", "state/ctld", "fakegpu"):
            (b / d).mkdir(parents=True, exist_ok=True)
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        fake = len(self.nodes) > 1 or self.nodes != ["localhost"]
        lines = [
            "ClusterName=fewstepci", "SlurmctldHost=localhost", f"SlurmctldPort={ctld_port}", "SlurmUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"StateSaveLocation={b}/state/ctld", f"SlurmdSpoolDir={b}/state/%n",
            f"SlurmctldPidFile={b}/run/slurmctld.pid", f"SlurmdPidFile={b}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={b}/log/slurmctld.log", f"SlurmdLogFile={b}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            # Schedule on every event and re-test pending jobs each second (a requeued job waits for its BeginTime).
            "SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1",
            "SlurmdParameters=config_overrides", "EnforcePartLimits=ALL", "MpiDefault=none", "SwitchType=switch/none",
            "MailProg=/bin/true", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none", "ReturnToService=2",
            "GresTypes=gpu", "KillWait=30", "MinJobAge=600",
            # A requeued job may start again only after the step credential lifetime (default 120 s); keep it short.
            f"AuthInfo=cred_expire={self.cred_expire}",
        ]
        gres = ["AutoDetect=off"]
        for name, port in zip(self.nodes, node_ports):
            addr = " NodeHostname=localhost NodeAddr=127.0.0.1" if fake else ""
            lines.append(f"NodeName={name}{addr} Port={port} CPUs={self.cpus} RealMemory={self.mem}"
                         f" Gres=gpu:{self.gpus} State=UNKNOWN")
            for i in range(self.gpus):
                link = b / "fakegpu" / f"{name}-nvidia{i}"
                if not link.is_symlink():
                    link.symlink_to("/dev/null")  # GRES File= must be a char/block device; /dev/null is one
            gres.append(f"NodeName={name} Name=gpu File={b}/fakegpu/{name}-nvidia[0-{self.gpus - 1}]")
        # `gpu` is the partition the sbatch scripts name; `debug` is the default for ad-hoc jobs.
        lines += ["PartitionName=gpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                  "PartitionName=debug Nodes=ALL MaxTime=INFINITE State=UP"]
        self.conf.write_text("\n".join(lines) + "\n")
        (b / "etc" / "gres.conf").write_text("\n".join(gres) + "\n")

    def _ensure_hosts(self):
        missing = [n for n in self.nodes if not _resolves(n)]
        if missing:
            self._hosts_backup = HOSTS.read_text()
            with HOSTS.open("a") as f:  # append in place: /etc/hosts may be a bind mount
                f.write(("" if self._hosts_backup.endswith("\n") else "\n") + "127.0.0.1 " + " ".join(missing) + "\n")

    def _ensure_munge(self):
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # a working munged is already running: use it, it is not ours to stop
        if not MUNGE_KEY.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={MUNGE_KEY}"], check=True)
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        self._pids.append(int(MUNGE_PIDFILE.read_text()))
        subprocess.run("munge -n | unmunge", shell=True, check=True, capture_output=True)

    # ---- lifecycle -----------------------------------------------------------------------------------------------
    def start(self, timeout=60.0):
        """Write the config, start the daemons and wait until every node is idle."""
        self._write_config()
        self._ensure_hosts()
        self._ensure_munge()
        run = self.base / "run"
        subprocess.run(["/usr/sbin/slurmctld", "-i"], env=self.env, check=True)
        self._pids.append(self._read_pid(run / "slurmctld.pid"))
        for name in self.nodes:
            subprocess.run(["/usr/sbin/slurmd", "-N", name], env=self.env, check=True)
            self._pids.append(self._read_pid(run / f"slurmd-{name}.pid"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.cmd("sinfo", "-h", "-N", "-p", "gpu", "-o", "%N %t", check=False)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            if sorted(states) == sorted(self.nodes) and set(states.values()) == {"idle"}:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"Slurm nodes not idle after {timeout}s: {r.stdout!r} {r.stderr!r}; logs in {self.base}/log")

    @staticmethod
    def _read_pid(path, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return int(path.read_text().strip())
            except (FileNotFoundError, ValueError):
                time.sleep(0.05)
        raise RuntimeError(f"daemon did not write its PID file {path}")

    def stop(self, drain_timeout=45.0):
        """Cancel leftover jobs, stop the daemons this object started (slurmds, slurmctld, then munged) by PID,
        end any process still tied to this cluster, and restore /etc/hosts."""
        try:
            if self._pids:
                self._drain(drain_timeout)
            _stop_pids(self._pids[::-1])
            self._pids = []
            _stop_pids(self._stragglers())
        finally:
            if self._hosts_backup is not None:
                if HOSTS.read_text().startswith(self._hosts_backup):  # only appended to: cut back, never emptied
                    os.truncate(HOSTS, len(self._hosts_backup.encode()))
                else:
                    HOSTS.write_text(self._hosts_backup)
                self._hosts_backup = None

    def _drain(self, timeout):
        """scancel every job of this (private) cluster and wait until squeue is empty, so no slurmstepd is orphaned
        by stopping its slurmd first (orphans keep retrying a slurmctld that is gone)."""
        ids = self.cmd("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if not ids:
            return
        self.cmd("scancel", *ids, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.cmd("squeue", "-h", "-o", "%i", check=False)
            if r.returncode == 0 and not r.stdout.strip():
                return
            time.sleep(0.2)

    def _stragglers(self):
        """PIDs of processes started through this cluster (slurmstepd, job tasks) that are still alive: they carry
        SLURM_CONF=<this cluster's slurm.conf> in their environment, which no other process can have."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if marker in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:  # gone, or not ours to read
                pass
        return pids

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- client helpers ------------------------------------------------------------------------------------------
    def cmd(self, *args, check=True, env=None, cwd=None):
        """Run a Slurm client command against this cluster; return the CompletedProcess (text).

        `env` entries are added to the environment (jobs inherit it); a value of None removes that variable.
        """
        full = {k: v for k, v in {**self.env, **(env or {})}.items() if v is not None}
        r = subprocess.run(list(args), env=full, cwd=cwd, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} failed (rc {r.returncode}): {r.stderr.strip()}")
        return r

    def sbatch(self, script, *args, options=(), env=None, cwd=None):
        """Submit `script` with sbatch `options` and script `args`; return the job id (int)."""
        r = self.cmd("sbatch", "--parsable", *options, str(script), *args, env=env, cwd=cwd)
        return int(r.stdout.strip().split(";")[0])

    def job(self, jobid):
        """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        return parse_show(self.cmd("scontrol", "show", "job", "-o", str(jobid)).stdout)

    def wait(self, jobid, until, timeout, poll=0.1):
        """Poll the job every `poll` s until `until(job_dict)` is true; return the dict. Raise on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(jobid)
            if until(info):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {jobid} did not reach the expected state in {timeout}s: {info}")
            time.sleep(poll)

    def wait_finished(self, jobid, timeout):
        """Wait until the job is out of squeue's active states; return its final `scontrol show job` dict."""
        active = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                  "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}
        return self.wait(jobid, lambda j: j.get("JobState") not in active, timeout)
