"""fewstep.engine.distributed: collectives on the communication device, one reduction per step, store-based waits,
directory sharing groups, and the launch environment (torchrun, deepspeed, bare srun, plain python)."""
import ast
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from fewstep.engine import distributed, launch
from fewstep_testing import PY, cpu_env, free_port, free_ports, run, write_dataset

REPO = Path(__file__).resolve().parents[2]

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv"}
COMM_MODULES = {"torch.distributed", "deepspeed.comm"}


def direct_collective_calls(path: Path) -> list[str]:
    """`dist.all_reduce(...)`-style calls in one file, whatever the module is imported as."""
    tree = ast.parse(path.read_text())
    aliases, direct = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name in COMM_MODULES}
        elif isinstance(node, ast.ImportFrom):
            if node.module in COMM_MODULES:
                direct |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
            elif node.module in ("torch", "deepspeed"):
                aliases |= {a.asname or a.name for a in node.names if a.name in ("distributed", "comm")}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in aliases | COMM_MODULES:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(f)}")
        elif isinstance(f, ast.Name) and f.id in direct:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {f.id}")
    return found


def test_collectives_only_in_the_distributed_module():
    """Every collective fewstep issues goes through engine/distributed.py, which puts tensors on the comm device:
    a `dist.all_reduce(torch.tensor(...))` anywhere else would put a CPU tensor into an NCCL collective."""
    allowed = REPO / "src" / "fewstep" / "engine" / "distributed.py"
    files = [p for d in ("src", "launcher", "kernels", "bench") for p in (REPO / d).rglob("*.py") if p != allowed]
    assert len(files) > 30
    found = [hit for p in files for hit in direct_collective_calls(p)]
    assert not found, "collectives outside fewstep.engine.distributed:\n" + "\n".join(found)
    # the scanner itself finds the pattern it guards against
    sample = REPO / "tests" / "engine" / "_scan_sample.py"
    try:
        sample.write_text("import torch.distributed as dist\nimport torch\n"
                          "def f(x):\n    dist.all_reduce(torch.tensor([x]))\n    torch.distributed.barrier()\n")
        assert len(direct_collective_calls(sample)) == 2
    finally:
        sample.unlink()


def test_comm_device_follows_what_the_group_serves():
    """Under a group that serves only CUDA (here gloo registered for cuda alone, which rejects CPU tensors exactly
    as NCCL does) the comm device is CUDA, not the CPU; under plain gloo it is the CPU."""
    code = textwrap.dedent("""
        import os, torch, torch.distributed as dist
        from fewstep.engine import distributed
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
        torch.cuda.current_device = lambda: 0  # no GPU here; the rule only needs the index
        dist.init_process_group("cuda:gloo", rank=0, world_size=1)
        try:
            dist.all_reduce(torch.zeros(1))
            raise SystemExit("a cuda-only group accepted a CPU tensor")
        except RuntimeError as e:
            assert "No backend type associated with device type cpu" in str(e), e
        print("nccl-like", distributed.comm_device())
        dist.destroy_process_group()
        dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:" + os.environ["PORT2"])
        print("gloo", distributed.comm_device())
        dist.destroy_process_group()
    """)
    port, port2 = free_ports(2)
    proc = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=cpu_env(PORT=str(port), PORT2=str(port2)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nccl-like cuda:0" in proc.stdout and "gloo cpu" in proc.stdout, proc.stdout


def test_collectives_waits_scan_tiny_build_and_abort_on_two_ranks(tmp_path):
    write_dataset(str(tmp_path / "scan"), n=5)
    proc = run(["torchrun", "--nproc_per_node", "2", "--standalone", "tests/engine/collectives_worker.py",
                str(tmp_path)], timeout=180)
    for check in ("reduce_step ok", "store wait ok", "sharing_group ok", "spread scan ok", "tiny pipeline ok",
                  "sharing_group disagreement ok", "complete wait ok", "abort ok", "plain barrier times out"):
        assert proc.stdout.count(check) == 2, proc.stdout


def test_a_good_run_ends_with_status_0_on_every_rank_when_rank_0_hosts_the_store():
    """srun / the deepspeed launcher: rank 0's process hosts the rendezvous store. Rank 0 reaching the final wait
    last must not leave before rank 1 has seen it (rank 1 would lose the store and fail a finished run)."""
    port = str(free_port())
    procs = [subprocess.Popen([PY, "tests/engine/teardown_worker.py"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=cpu_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT=port)) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"rank {r} finished" in out, (r, p.returncode, err[-2000:])


def test_after_a_failure_rank_0_leaves_last():
    """After a failure every rank leaves through launcher/train.py's os._exit; rank 0's process may host the store,
    so it waits until every rank has counted itself out: a rank that meets the failure 3 s later still reads it,
    without c10d's "connection reset" dump (a fixed 2 s pause lost it)."""
    port = str(free_port())
    procs = [subprocess.Popen([PY, "tests/engine/failure_exit_worker.py"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=cpu_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT=port)) for r in (0, 1)]
    (out0, err0), (out1, err1) = (p.communicate(timeout=120) for p in procs)
    assert [p.returncode for p in procs] == [2, 2], (err0[-2000:], err1[-2000:])
    assert "rank 1 read: rank 0 failed: UserError: a mistake on rank 0" in out1, (out1, err1[-2000:])
    assert "Exception raised from" not in err0 + err1 and "rank 1 left" in out1, err1[-3000:]
    assert float(out0.split("rank 0 left after ")[1].split()[0]) >= 3.0, out0


def test_a_rank_that_joins_later_than_the_collective_timeout_is_waited_for(tmp_path):
    """The rendezvous waits for a late rank (a node that starts late, slow imports on a shared filesystem) however
    short `distributed_timeout_seconds` is; that timeout still bounds every collective."""
    port = str(free_port())
    procs = [subprocess.Popen([PY, "tests/engine/startup_worker.py", "2", str(tmp_path / "ready")], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=cpu_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT=port)) for r in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and "started together" in out, (r, p.returncode, err[-2000:])
    assert "collective timed out" in outs[1][0]


# ---- launch environment -------------------------------------------------------------------------------------------
def test_torchrun_and_deepspeed_launcher_env_is_used_as_is():
    assert launch.launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "a",
                                   "MASTER_PORT": "1"}) == {}
    assert launch.launch_env({"RANK": "0", "WORLD_SIZE": "1"}) == {"LOCAL_RANK": "0"}
    with pytest.raises(launch.LaunchError, match="WORLD_SIZE"):
        launch.launch_env({"RANK": "0"})


def test_bare_srun_task_env(monkeypatch):
    """`srun python launcher/train.py` (no slurm/common.sh): rank, world and local rank from SLURM_*, master = the
    step's first node's address, port from the job id (as slurm/common.sh derives it). Values as Slurm 22.05 sets them."""
    task = {"SLURM_JOB_ID": "4321", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
            "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NODELIST": "gpu[07-10]",
            "SLURM_JOB_NODELIST": "gpu[07-10]"}
    monkeypatch.setattr(launch, "node_address", lambda node: f"addr-of-{node}")  # Slurm's real answer: tests/slurm
    assert launch.launch_env(task) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                       "MASTER_ADDR": "addr-of-gpu07", "MASTER_PORT": str(10000 + 4321 % 20000)}
    # the batch shell itself (no job step) is a single process, however many tasks the job has
    batch = {k: v for k, v in task.items() if not k.startswith("SLURM_STEP")}
    assert launch.launch_env(batch)["WORLD_SIZE"] == "1"
    broken = {k: v for k, v in task.items() if k != "SLURM_LOCALID"}
    with pytest.raises(launch.LaunchError, match="SLURM_LOCALID"):
        launch.launch_env(broken)


def test_plain_python_is_a_world_of_one():
    env = launch.launch_env({})
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert env["MASTER_PORT"] == "0"  # its store binds a free port itself: runs started together cannot collide


@pytest.mark.parametrize("spec,hosts", [("n1", ["n1"]), ("n[1-2]", ["n1", "n2"]),
                                        ("gpu[08-10,12],login1", ["gpu08", "gpu09", "gpu10", "gpu12", "login1"]),
                                        ("r[1-2]-ib[0-1]", ["r1-ib0", "r1-ib1", "r2-ib0", "r2-ib1"])])
def test_expand_hostlist(spec, hosts):
    assert launch.expand_hostlist(spec) == hosts


def test_device_is_local_rank_modulo_visible_gpus(monkeypatch):
    """Sites that bind one GPU per task show each task a single device: LOCAL_RANK 3 must then use cuda:0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert launch.local_device(3) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert launch.local_device(3) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.local_device(3) == torch.device("cpu")


def test_deepspeed_is_handed_the_gpu_index_a_bound_task_sees(monkeypatch):
    """DeepSpeed takes its GPU from LOCAL_RANK (init_process_group's device_id, the engine's set_device, zero.Init):
    a task with LOCAL_RANK 3 that sees one GPU must hand it 0, or it asks for cuda:3 ("invalid device ordinal").
    CUDA is faked and DeepSpeed's init only records what it would read (neither can run here)."""
    import deepspeed

    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(distributed, "_launch_local_rank", [None])  # setup writes it; leave this process as it was
    seen = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.update(local_rank=os.environ["LOCAL_RANK"]))
    monkeypatch.setattr(torch.distributed.distributed_c10d, "_set_pg_timeout", lambda *a, **k: None)  # no group
    monkeypatch.setattr(torch.distributed, "new_group", lambda **kw: "world group")  # nor DeepSpeed's clone of it
    monkeypatch.setattr(deepspeed.utils.groups, "_WORLD_GROUP", None)  # (restored after the test)
    info = distributed.setup_distributed(60)
    assert seen == {"local_rank": "0"} and info.device == torch.device("cuda", 0)
    assert (info.rank, info.local_rank) == (3, 3)  # the launcher's, for per-node work
