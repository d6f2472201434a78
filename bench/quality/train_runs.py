"""Run training commands as subprocesses (optionally in parallel), logging to files, timing wall and CPU seconds."""
from __future__ import annotations

import os
import subprocess
import time


def run_parallel(commands: dict[str, list[str]], logs: dict[str, str], cwd: str,
                 tag: str = "quality") -> dict[str, dict]:
    """Start every command at once; wait for all. Returns {name: {returncode, wall_s, cpu_s}} (CPU = user + sys of the
    child and its descendants, from `os.wait4`). Each finish is printed, prefixed `tag`. Only these children are
    waited for, so the caller may run this in a thread while doing other work."""
    procs, starts, results = {}, {}, {}
    for name, cmd in commands.items():
        fh = open(logs[name], "w")
        procs[name] = (subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT), fh)
        starts[name] = time.time()
    by_pid = {p.pid: name for name, (p, _) in procs.items()}
    while by_pid:
        for pid in list(by_pid):
            reaped, status, usage = os.wait4(pid, os.WNOHANG)
            if reaped == 0:  # still running
                continue
            name = by_pid.pop(pid)
            proc, fh = procs[name]
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
            fh.close()
            results[name] = {"returncode": proc.returncode, "wall_s": time.time() - starts[name],
                             "cpu_s": usage.ru_utime + usage.ru_stime}
            print(f"{tag}: {name} finished (exit {proc.returncode}) in {results[name]['wall_s']:.0f} s wall, "
                  f"{results[name]['cpu_s']:.0f} s CPU", flush=True)
        time.sleep(0.2)
    return results
