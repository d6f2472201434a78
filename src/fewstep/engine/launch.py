"""The launch environment: which rank this process is, of how many, where the rendezvous is, and which device it
trains on, from torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK), Slurm's srun (SLURM_PROCID,
SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_STEP_NODELIST) or, for plain `python`, a world of one. No collectives:
`fewstep.engine.distributed` sets the process group up from what this module finds.
"""
from __future__ import annotations

import re
import subprocess
import time

import torch

from fewstep.errors import UserError


class LaunchError(UserError, RuntimeError):
    """The launch environment is inconsistent (a user-facing error)."""


def expand_hostlist(spec: str) -> list[str]:
    """Slurm's compressed host list -> host names: 'gpu[01-03,07],login1' -> gpu01 gpu02 gpu03 gpu07 login1."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += (ch == "[") - (ch == "]")
        cur += ch
    parts.append(cur)
    hosts = []
    for part in filter(None, parts):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, rest = m.groups()
        tails = expand_hostlist(rest) if rest else [""]
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.extend(f"{prefix}{str(n).zfill(len(lo))}{tail}" for tail in tails)
    return hosts


def node_address(node: str, attempts: int = 3) -> str:
    """A Slurm node's NodeAddr, the address Slurm itself reaches it at (as slurm/common.sh): a node name need not
    resolve, or may resolve to another interface. Every task asks (a bare srun has no step before them); a busy
    controller is asked again, since tasks that fell back to the name while others got the address would not meet.
    Without scontrol, or where it does not know the node, the name itself, said once per task."""
    why = "no answer"
    for attempt in range(attempts):
        try:
            r = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True,
                               errors="replace", timeout=30)
        except FileNotFoundError:
            return node  # not a Slurm client: the name is all there is
        except (OSError, subprocess.SubprocessError) as e:
            why = str(e)
        else:
            m = re.search(r"\bNodeAddr=(\S+)", r.stdout)
            if m:
                return m.group(1)
            why = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()[0]
        if attempt + 1 < attempts:
            time.sleep(1 + attempt)
    print(f"fewstep: rendezvous at node name '{node}' (scontrol gave no NodeAddr: {why[:200]}); set MASTER_ADDR or "
          "launch through slurm/common.sh if it does not resolve to that node", flush=True)
    return node


def launch_env(env: dict[str, str]) -> dict[str, str]:
    """The rendezvous variables to add to `env` so that `init_process_group(env://)` finds its world.

    torchrun / the deepspeed launcher / slurm/common.sh set RANK and WORLD_SIZE: nothing to add. A bare
    `srun python launcher/train.py` has only SLURM_*: rank, local rank and world come from there, the master is the
    first node of the step (its NodeAddr) and the port is derived from the job id (as in slurm/common.sh). Plain
    `python`: a world of one on a free local port.
    """
    if "RANK" in env:
        if "WORLD_SIZE" not in env:
            raise LaunchError("RANK is set but WORLD_SIZE is not: launch with torchrun, deepspeed or srun")
        return {} if "LOCAL_RANK" in env else {"LOCAL_RANK": env["RANK"]}
    ntasks = env.get("SLURM_STEP_NUM_TASKS") if "SLURM_STEP_ID" in env else None
    if ntasks is not None and int(ntasks) > 1:
        missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID") if k not in env]
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if missing or not nodes:
            raise LaunchError(f"srun started {ntasks} tasks but {missing or 'SLURM_STEP_NODELIST'} is unset; "
                              "launch through slurm/common.sh or set RANK/WORLD_SIZE/LOCAL_RANK yourself")
        out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": ntasks, "LOCAL_RANK": env["SLURM_LOCALID"]}
        if "MASTER_ADDR" not in env:
            out["MASTER_ADDR"] = node_address(expand_hostlist(nodes)[0])
        if "MASTER_PORT" not in env:
            # as slurm/common.sh: fixed per job id (a requeue keeps it), below Linux's ephemeral ports (32768+)
            out["MASTER_PORT"] = str(10000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return out
    out = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in env:  # a world of one hosts its own store: port 0 lets it bind any free port itself
        out["MASTER_PORT"] = "0"  # (picking one here and binding it later races other runs started at once)
    return out


def local_device(local_rank: int) -> torch.device:
    """cuda:(LOCAL_RANK mod visible GPUs), so sites that bind one GPU per task (each task sees one) work too."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())
