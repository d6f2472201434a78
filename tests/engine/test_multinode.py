"""What CPU + gloo on one machine usually hides: slow rank-0 work inside a collective timeout, and node-local paths.

- Rank 0 is made slow (FEWSTEP_TEST_DELAY) in each place where it works alone or longer than the others (cache
  fill, model load, metrics logger set-up, validation decoding, exports, checkpoint writes inside and after
  DeepSpeed's save) under a collective timeout shorter than the delay: the run must still complete.
- Two "nodes" are two processes with LOCAL_RANK 0 each, each in its own mount namespace with a private tmpfs at the
  same cache_dir path: exactly what a node-local scratch directory looks like to a multi-node job.
"""
import json
import os
import shutil
import subprocess
import time

import pytest

from fewstep_testing import PY, REPO, cpu_env, free_port, read_metrics, run, write_config, write_dataset


SLOW_PLACES = ("cache", "load", "logger", "validation", "export", "deepspeed-save", "checkpoint")


def test_slow_rank0_work_survives_a_short_collective_timeout(tmp_path):
    backend = write_dataset(str(tmp_path), n=3)
    cfg = write_config(str(tmp_path), backend, zero_stage=3, use_ema=True, ema_decay=0.9, max_train_steps=2,
                       checkpointing_steps=1, distributed_timeout_seconds=3)
    proc = run(["torchrun", "--nproc_per_node", "2", "--standalone", "launcher/train.py",
                "--config", cfg], timeout=600,
               FEWSTEP_TEST_DELAY=",".join(f"{where}:5" for where in SLOW_PLACES))
    for where in SLOW_PLACES:
        assert f"rank 0 delayed 5 s at {where}" in proc.stdout, proc.stdout[-3000:]
    out = tmp_path / "out"
    assert len(read_metrics(out)) == 2
    assert (out / "pytorch_lora_weights.safetensors").exists() and (out / "ema" / "pytorch_lora_weights.safetensors").exists()


def _unshare_available() -> str | None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "node-local directories are simulated with `unshare -m` + tmpfs, which needs root"
    r = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"unshare -m does not work here: {r.stderr.strip()}"


@pytest.fixture
def node_local(tmp_path):
    """The folder each 'node' of `_launch_nodes` sees as its own private tmpfs (skipped where `unshare -m` fails)."""
    reason = _unshare_available()
    if reason:
        pytest.skip(reason)
    path = tmp_path / "scratch"
    path.mkdir()
    return path


def _launch_nodes(cfg, local_path, port, extra_env=None, rank0_files=None, node_files=None, kill_on_bad_exit=False):
    """Start ranks 0 and 1 as two 'nodes' (LOCAL_RANK 0 each), each with a private tmpfs mounted at `local_path`;
    `rank0_files`: a folder whose contents are copied into rank 0's tmpfs only (rank 1's gets an empty images/);
    `node_files`: one folder per rank, copied into that rank's tmpfs; `kill_on_bad_exit`: as srun's, the first
    rank to exit non-zero has the other SIGKILLed."""
    procs = []
    for rank in (0, 1):
        env = cpu_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      **(extra_env or {}))
        copy = (f'cp -r "{rank0_files}"/. "$1"/ && ' if rank == 0 else 'mkdir "$1/images" && ') if rank0_files else ""
        copy += f'cp -r "{node_files[rank]}"/. "$1"/ && ' if node_files else ""
        script = f'mount -t tmpfs fewstep-node{rank} "$1" && {copy}exec "$2" launcher/train.py --config "$3"'
        procs.append(subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "node",
                                       local_path, PY, cfg], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    if kill_on_bad_exit:
        deadline = time.monotonic() + 600
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        if any(p.returncode for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()  # SIGKILL: unshare and sh exec the trainer, so this is its PID
    return [(p.wait(timeout=600), *p.communicate()) for p in procs]


def test_two_nodes_each_fill_their_node_local_cache(tmp_path, node_local):
    backend = write_dataset(str(tmp_path), n=3)
    cfg = write_config(str(tmp_path), backend, cache_dir=str(node_local / "cache"), max_train_steps=2,
                       validation_steps=0, train_batch_size=1)
    results = _launch_nodes(cfg, str(node_local), free_port())
    for rank, (rc, out, err) in enumerate(results):
        assert rc == 0, f"rank {rank} exited {rc}\n{out[-2000:]}\n{err[-4000:]}"
    assert "1 rank(s) per cache directory" in results[0][1]  # each node filled its own copy
    # each loaded the encoders: only rank 0 shows the libraries' loading bars (one set per job log)
    assert "Loading weights" in results[0][2] and "Loading weights" not in results[1][2], results[1][2][-2000:]
    assert not os.listdir(node_local)  # nothing leaked to the real directory under the mounts
    assert len(read_metrics(tmp_path / "out")) == 2


def test_node_local_output_dir_is_refused_by_name(tmp_path, node_local):
    backend = write_dataset(str(tmp_path), n=2)
    cfg = write_config(str(tmp_path), backend, output_dir=str(node_local / "run"), cache_dir=str(tmp_path / "c"))
    results = _launch_nodes(cfg, str(node_local), free_port())
    rc, out, err = results[0]
    # both ranks find the mistake; whichever reports first, rank 0 ends with status 2 (its own error or rank 1's)
    assert rc == 2, f"{out[-2000:]}\n{err[-3000:]}"
    assert f"output_dir '{node_local / 'run'}' is not shared by all 2 ranks" in err
    assert "Traceback" not in err


def test_a_mistake_every_rank_meets_at_once_is_said_once(tmp_path, node_local):
    """A data config missing on every node: both ranks fail at once with the same error. Whichever announces it
    first prints it, and no other line repeats it; rank 0, which hosts the store, does not leave while rank 1 still
    talks to it (c10d's 'connection reset' dump with C++ frames)."""
    cfg = write_config(str(tmp_path), str(tmp_path / "nowhere.json"), cache_dir=str(tmp_path / "c"))
    for _ in range(2):  # the race goes either way
        results = _launch_nodes(cfg, str(node_local), free_port())
        assert [r[0] for r in results] == [2, 2], results
        both = results[0][2] + results[1][2]
        assert "Traceback" not in both and "Exception raised from" not in both, both[-3000:]
        lines = [line for line in both.splitlines() if line.startswith("fewstep: ")]
        assert len(lines) == 1 and lines[0].endswith(f"data_backend_config not found: {tmp_path / 'nowhere.json'}"), \
            lines


def test_images_on_one_node_only_stop_every_rank_with_one_line(tmp_path, node_local):
    """Node-local data that only rank 0's node holds: every rank reads images (the first scan is spread over ranks),
    so the run stops with one line naming the rank and the image, on every rank, instead of a hang. Twice: the image
    folder exists on rank 1's node but is empty (the image is missing in rank 1's share of the scan); and no folder
    at all on rank 1's node (rank 1 fails reading the data config, inside that read's wait: rank 0 names where)."""
    write_dataset(str(tmp_path / "src"), n=4)
    backend = tmp_path / "multidatabackend.json"
    for image_dir, expected in ((node_local / "images", "failed during data probe: DataError: image '"),
                                (node_local / "nowhere", "failed during data config: DataError: ")):
        backend.write_text(json.dumps([{"backend": "simple", "resolution": 32, "image_dir": str(image_dir),
                                        "caption_extension": ".txt"}]))
        if image_dir.name == "nowhere":
            shutil.copytree(tmp_path / "src" / "images", tmp_path / "src" / "nowhere")
        cfg = write_config(str(tmp_path), str(backend), cache_dir=str(tmp_path / "c"))
        results = _launch_nodes(cfg, str(node_local), free_port(), rank0_files=str(tmp_path / "src"))
        rc, out, err = results[0]
        # rank 0 ends as the failing rank 1 does: a user's mistake (node-local data), exit status 2
        assert rc == 2 and results[1][0] == 2, f"{out[-2000:]}\n{err[-3000:]}\n{results[1][2][-3000:]}"
        assert f"fewstep: rank 1 {expected}" in err and "does not exist" in err, err[-3000:]
        assert "Traceback" not in err
        # rank 1 says it itself too: srun --kill-on-bad-exit may stop rank 0 before it reads rank 1's message
        own = [line for line in results[1][2].splitlines() if line.startswith("fewstep: rank 1: ")]
        assert len(own) == 1 and "does not exist" in own[0], results[1][2][-3000:]


def test_a_config_missing_on_one_node_is_reported_by_that_node(tmp_path, node_local):
    """The config file on a node-local disk that only rank 0's node has: rank 1 fails before the ranks meet, while
    rank 0 goes on to wait for it, and srun --kill-on-bad-exit then SIGKILLs rank 0. The only line the user gets is
    rank 1's, so rank 1 (its node's first rank) must print it."""
    backend = write_dataset(str(tmp_path), n=2)
    (tmp_path / "rank0").mkdir()
    shutil.copy(write_config(str(tmp_path), backend), tmp_path / "rank0" / "config.json")
    results = _launch_nodes(str(node_local / "config.json"), str(node_local), free_port(),
                            rank0_files=str(tmp_path / "rank0"), kill_on_bad_exit=True)
    rc, out, err = results[1]
    assert rc == 2 and results[0][0] == -9, f"{out[-2000:]}\n{err[-3000:]}"
    assert f"fewstep: rank 1: config file not found: {node_local / 'config.json'}" in err, err[-3000:]
    assert "Traceback" not in err


def test_model_copies_that_differ_between_nodes_are_refused(tmp_path, node_local):
    """Each node has its own copy of the model at the same path (a node-local scratch disk); one node's text encoder
    differs (a partial or other copy). The ranks would fill different cache folders while splitting the work as
    one: every rank stops with one line instead."""
    from fewstep.models.tiny import ensure_tiny_pipeline

    backend = write_dataset(str(tmp_path), n=2)
    copies = [tmp_path / f"node{r}" for r in (0, 1)]
    for c in copies:
        shutil.copytree(ensure_tiny_pipeline("flux"), c / "model", copy_function=shutil.copy)
    with open(copies[1] / "model" / "text_encoder" / "model.safetensors", "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x01\x02\x03\x04")
    cfg = write_config(str(tmp_path), backend, pretrained_model_name_or_path=str(node_local / "model"),
                       cache_dir=str(tmp_path / "cache"))
    results = _launch_nodes(cfg, str(node_local), free_port(), node_files=[str(c) for c in copies])
    for rank, (rc, out, err) in enumerate(results):
        assert rc == 2 and "Traceback" not in err, f"rank {rank} exited {rc}\n{out[-2000:]}\n{err[-3000:]}"
    said = results[0][2] + results[1][2]  # by whichever rank announced it first (one .out under srun)
    assert "text-encoder files of" in said and "differ between ranks (ranks [1] differ from rank 0)" in said


def test_a_cache_folder_one_node_cannot_create_stops_every_rank_with_its_message(tmp_path, node_local):
    """A node-local cache_dir that one node cannot create (here a file in its place on rank 1's node): every rank
    creates its cache folders, and rank 1's failure must reach rank 0 as that message (exit 2), not as a broken
    collective (gloo's "connection closed"; under NCCL a wait for the whole timeout)."""
    backend = write_dataset(str(tmp_path), n=2)
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for n in nodes:
        n.mkdir()
    (nodes[1] / "cache").write_text("not a folder")
    cfg = write_config(str(tmp_path), backend, cache_dir=str(node_local / "cache"))
    results = _launch_nodes(cfg, str(node_local), free_port(), node_files=[str(n) for n in nodes])
    (rc, out, err), (rc1, _, err1) = results
    assert (rc, rc1) == (2, 2), f"{out[-2000:]}\n{err[-3000:]}\n{err1[-3000:]}"
    assert "fewstep: rank 1 failed during cache folders: DataError: cache folder" in err, err[-3000:]
    assert "Traceback" not in err + err1
