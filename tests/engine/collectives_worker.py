"""2-rank checks of fewstep.engine.distributed on gloo, without DeepSpeed (so a launch costs ~3 s).

Usage: torchrun --nproc_per_node 2 collectives_worker.py TMPDIR
Prints "<check> ok" lines; any failed check raises.
"""
import os
import pickle
import sys
import time
from datetime import timedelta

import torch.distributed as dist

from fewstep.engine import distributed
from fewstep.engine.launch import LaunchError
from fewstep.engine.sharing import sharing_group

TIMEOUT = 2.0  # seconds: a plain collective times out when one rank is 4 s late (and not for scheduling hiccups
#                of a loaded 2-core box running test files in parallel)
tmp = sys.argv[1]
# the rendezvous waits as setup_distributed's does (a rank may start late on a loaded box); then the short timeout
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
dist.distributed_c10d._set_pg_timeout(timedelta(seconds=TIMEOUT))
rank = dist.get_rank()

# One reduction: means over ranks, flags true on any rank, in the order given.
means, flags = distributed.reduce_step({"loss": 1.0 + rank, "sigma": 0.25 * rank}, {"preempt": rank == 1, "bad": False})
assert means == {"loss": 1.5, "sigma": 0.125} and flags == {"preempt": True, "bad": False}, (means, flags)
assert distributed.any_rank(rank == 0) and not distributed.any_rank(False)
print("reduce_step ok", flush=True)

# The store-based wait tolerates any delay (longer than the collective timeout), and uneven_work ends in it.
if rank == 0:
    time.sleep(2 * TIMEOUT)
distributed.wait_for_all("late rank 0")
with distributed.uneven_work("rank-0 export"):
    if rank == 0:
        time.sleep(2 * TIMEOUT)
print("store wait ok", flush=True)

# Which ranks share a directory: one shared folder -> both; one folder per rank (node-local) -> each alone.
shared = sharing_group(os.path.join(tmp, "shared"))
assert (shared.members, shared.index) == ([0, 1], rank), shared
local = sharing_group(os.path.join(tmp, f"node{rank}"))
assert (local.members, local.index) == ([rank], 0), local
distributed.wait_for_all("cleaned")  # the group's first rank removes the markers after the others have left
assert not os.path.exists(os.path.join(tmp, "shared", ".fewstep-ranks"))  # markers cleaned up, folder too
print("sharing_group ok", flush=True)

# The first data scan is spread over ranks: each probes a disjoint share of the images (rank 0, slow at listing,
# waits in the store), rank 0 merges; the result is a one-process scan's; a restart probes nothing.
from fewstep.data import dataset as data_mod  # noqa: E402
from fewstep.data.backends import load_data_config  # noqa: E402
from fewstep.data.prepare import scan_images  # noqa: E402

config, memo = load_data_config(os.path.join(tmp, "scan", "multidatabackend.json")), os.path.join(tmp, "memo.json")
probed, real_probe = [], data_mod.probe_image
data_mod.probe_image = lambda p: probed.append(p) or real_probe(p)
os.environ["FEWSTEP_TEST_DELAY"] = f"scan:{2 * TIMEOUT}"
originals, payloads = {}, []  # what the scan sends through object collectives (over NCCL: through the GPU)
for name in ("broadcast_object", "gather_object", "all_gather_object"):
    originals[name] = real = getattr(distributed, name)
    setattr(distributed, name, lambda obj, *a, _real=real: payloads.append(pickle.dumps(obj)) or _real(obj, *a))
samples, skipped, n = scan_images(config, 1, memo)
for name, real in originals.items():
    setattr(distributed, name, real)
del os.environ["FEWSTEP_TEST_DELAY"]
images = sorted(s.image_path for s in samples)
assert payloads and not [p for p in payloads for path in images if os.path.basename(path).encode() in p], \
    "an image path went through an object collective"
shares = distributed.all_gather_object(sorted(probed))
assert n == 5 and all(shares) and not set(shares[0]) & set(shares[1]) and sum(map(len, shares)) == 5, shares
probed.clear()
again = scan_images(config, 1, memo)
assert (list(again[0]), again[1:]) == (list(samples), (skipped, 0)) and not probed, (again[2], probed)
assert (list(samples), skipped) == data_mod.collect_samples(config, 1)
print("spread scan ok", flush=True)

# The tiny pipeline a rank builds (the first rank to finish wins the cache) is complete on every rank: transformers
# writes nothing from save_pretrained on ranks > 0 of a process group unless told to.
from fewstep.models.tiny import save_tiny_pipeline  # noqa: E402

with distributed.uneven_work("tiny build"):  # seconds, and not the same on both ranks
    built = save_tiny_pipeline("flux", os.path.join(tmp, f"tiny-rank{rank}"))
assert all((built / enc / "model.safetensors").exists() for enc in ("text_encoder", "text_encoder_2")), rank
print("tiny pipeline ok", flush=True)

# Ranks that disagree about who shares a directory stop together with a clear error, even when their patience runs
# out at different times (rank 1 never sees rank 0's marker; rank 0's deadline is already past).
real_listdir = os.listdir
if rank == 1:
    os.listdir = lambda p=".": [f for f in real_listdir(p) if not ("disagree" in str(p) and f == "rank0")]
t0 = time.monotonic()
try:
    sharing_group(os.path.join(tmp, "disagree"), patience_seconds=0.0 if rank == 0 else 30.0)
    raise AssertionError("ranks that disagree were accepted")
except LaunchError as e:
    assert "ranks disagree about which of them share" in str(e) and time.monotonic() - t0 < 10, e
os.listdir = real_listdir
print("sharing_group disagreement ok", flush=True)

# A wait that was complete returns even if a rank fails as soon as it has left it (that failure stops the others
# at their next wait): rank 1 waits long enough for its polls to be 0.5 s apart; rank 0 arrives last and announces
# a failure at once, before rank 1's next poll. The announcement is then withdrawn for the checks below.
if rank == 0:
    time.sleep(2.0)
distributed.wait_for_all("complete before a failure")
if rank == 0:
    distributed.announce_failure(OSError("failed after the wait"), "the next step")
dist.barrier()  # plain collectives until it is withdrawn: a store wait would now stop with that failure
if rank == 0:
    distributed._store().delete_key(distributed._ABORT_KEY)
dist.barrier()
print("complete wait ok", flush=True)

# A failure inside uneven_work on rank 0 stops rank 1 with rank 0's message instead of a hang.
t0 = time.monotonic()
try:
    with distributed.uneven_work("export"):
        if rank == 0:
            raise OSError("disk full")
    raise AssertionError("rank 1 passed a wait that rank 0 never reached")
except distributed.RankFailed as e:
    assert rank == 1 and "rank 0 failed during export: OSError: disk full" in str(e), e
    assert time.monotonic() - t0 < 10
except OSError:
    assert rank == 0
print("abort ok", flush=True)

# Last (a timed-out gloo collective breaks the group): a plain barrier with rank 0 late by the same delay fails,
# so the timeout above was real.
if rank == 0:
    time.sleep(2 * TIMEOUT)
else:
    try:
        dist.barrier()
        raise AssertionError("a gloo barrier outlived its timeout")
    except RuntimeError:
        pass
print("plain barrier times out", flush=True)

# The group is broken now, so it cannot be torn down: leave without running gloo's destructors, which can abort the
# interpreter's exit ("terminate called without an active exception", status -6), as launcher/train.py does after
# a failure.
sys.stdout.flush()
os._exit(0)
