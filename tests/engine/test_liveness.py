"""fewstep.engine.liveness: a rank killed without a word (SIGKILL, as the out-of-memory killer does) does not leave
the others waiting for ever in a store wait, when no launcher agent stops them (a bare `srun`)."""
import subprocess

import pytest

from fewstep_testing import PY, REPO, cpu_env, free_port

TIMEOUT_S = 4  # distributed_timeout_seconds of the two ranks: the liveness bound


@pytest.mark.parametrize("victim, expected", [
    (1, "rank 1 has shown no sign of life for"),  # a worker rank dies: its heartbeat stops
    (0, "rank 1 lost the rendezvous store while waiting at 'cache fill'"),  # rank 0 (the store's host) dies
])
def test_a_killed_rank_stops_the_survivor(victim, expected):
    port = free_port()
    procs = [subprocess.Popen([PY, "tests/engine/liveness_worker.py", str(TIMEOUT_S), str(victim)], cwd=REPO,
                              env=cpu_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT=str(port), FEWSTEP_LIVENESS_MIN_SECONDS="0"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    out = [p.communicate(timeout=180) for p in procs]
    survivor = 1 - victim
    assert procs[victim].returncode == -9
    assert procs[survivor].returncode == 0, out[survivor]
    stdout = out[survivor][0]
    assert expected in stdout, stdout
    seconds = float(stdout.split("RankFailed after ")[1].split(" s:")[0])
    assert seconds < 4 * TIMEOUT_S + 30, seconds  # the bound plus one read interval, not a hang
