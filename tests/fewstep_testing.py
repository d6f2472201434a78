"""Helpers for tests: write a tiny image/caption dataset and a fewstep config that points at it."""
import concurrent.futures
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import traceback

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_dataset(root, n=2, size=40, seed=0, captions=None):
    """n random (not constant) RGB images with captions; returns the multidatabackend.json path."""
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    words = captions or ["a red circle", "a blue square", "a green grass field", "a yellow sun"]
    for i in range(n):
        arr = (rng.random((size, size + 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(img_dir, f"img{i}.png"))
        with open(os.path.join(img_dir, f"img{i}.txt"), "w") as fh:
            fh.write(words[i % len(words)])
    backend = os.path.join(root, "multidatabackend.json")
    with open(backend, "w") as fh:
        json.dump([{"backend": "simple", "resolution": 32, "shuffle": True, "image_dir": img_dir,
                    "caption_extension": ".txt"}], fh)
    return backend


def sample_table(root, samples):
    """`samples` (a list, as `collect_samples` gives) as the memory-mapped table the trainer's dataset reads, in a new
    folder under `root`."""
    import tempfile

    from fewstep.data.table import SampleTable
    return SampleTable.written(os.path.join(tempfile.mkdtemp(dir=str(root)), "samples"), samples)


def write_config(root, backend, **overrides):
    cfg = {"--model_type": "lora", "--model_family": "flux", "--pretrained_model_name_or_path": "tiny:flux",
           "--data_backend_config": backend, "--output_dir": os.path.join(root, "out"), "--train_batch_size": 2,
           "--max_train_steps": 4, "--learning_rate": 1e-3, "--lora_rank": 4, "--mixed_precision": "fp32",
           "--checkpointing_steps": 0, "--validation_steps": 0, "--validation_num_inference_steps": 2}
    cfg.update({k if k.startswith("--") else "--" + k: v for k, v in overrides.items()})
    path = os.path.join(root, "config.json")
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    return path


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "logs", "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def cpu_env(**extra):
    """The environment of a fewstep process a test starts: this one's, on the CPU, without the Slurm job the suite
    may itself run in (a test that wants Slurm variables passes them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if not torch.cuda.is_available():  # on a GPU machine the tests run as users would, on CUDA
        env["DS_ACCELERATOR"] = "cpu"
    env.update(extra)
    return env


_PORTS = random.SystemRandom()  # the global `random` is reseeded by in-process training: test processes would agree


def free_ports(n: int = 1) -> list[int]:
    """n distinct TCP ports, free now, for processes a test starts by hand (a rendezvous store binds one seconds
    later). Drawn below Linux's ephemeral range (32768+): a port the kernel hands out (bind to port 0, or any
    outgoing connection, gloo's included) could be taken by another test's connection before the store binds it."""
    ports = []
    while len(ports) < n:
        port = _PORTS.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def mount_small_disk(path, size: str) -> bool:
    """Mount a tmpfs of `size` (e.g. "256k") at `path`, created here (root only): a disk that fills up. False where
    that is not possible; the caller unmounts (`umount -l`)."""
    path.mkdir(parents=True, exist_ok=True)
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                                capture_output=True).returncode == 0


def run(cmd, timeout=600, **env):
    """Run a command from the repo root; on failure raise with the first traceback (under torchrun that is the rank
    that failed first; the other ranks' tracebacks that follow are mostly the broken connection) and the output tail."""
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(**env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        first = proc.stderr.find("Traceback")
        cause = proc.stderr[first:first + 3000] if first >= 0 else ""
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- first traceback ---\n{cause}\n"
                             f"--- stdout tail ---\n{proc.stdout[-3000:]}\n--- stderr tail ---\n{proc.stderr[-4000:]}")
    return proc


PY = sys.executable


def assert_resumed_run_matches(straight, resumed, steps, read_lora):
    """A run interrupted and resumed logged every step once and equals the straight run bit for bit (losses, LRs,
    the exported LoRA), which trained; returns the straight run's LoRA."""
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in b] == list(range(1, steps + 1))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]  # bit-exact
    assert [m["lr"] for m in a] == [m["lr"] for m in b]
    wa, wb = read_lora(straight), read_lora(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(wa[k].abs().sum() > 0 for k in wa if "lora_B" in k)  # it trained
    return wa


def side_by_side(*calls):
    """Call each function at once in a thread; their results, in order. For independent single-process trainings
    (each uses one core under OMP_NUM_THREADS=1, so two of them keep both of CI's cores busy)."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [job.result() for job in [pool.submit(call) for call in calls]]


class EngineWrapper(torch.nn.Module):
    """A module behind `.module`, called through, as a DeepSpeed engine wraps the model (for step code tested
    without DeepSpeed)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class HostToDeviceCopies(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every copy of a host tensor onto another device as (where, shape, blocking): `where` the "file:line" of
    fewstep's code that made it, `blocking` whether it waits for the device's queue (non_blocking off: on CUDA a
    stream synchronisation). With tensors on the meta device, which have no values to read, this and the errors meta
    raises on any device->host read (`.item()`, `.tolist()`, `.cpu()`, `nonzero`, a bool-mask index) show, on the
    CPU, every place a GPU step would wait for the GPU."""

    def __init__(self):
        super().__init__()
        self.copies = []

    @property
    def blocking(self) -> list:
        return [c for c in self.copies if c[2]]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src, dst = (args[1], args[0]) if func is torch.ops.aten.copy_.default else (args[0], out)
            if src.device.type == "cpu" and dst.device.type != "cpu":
                blocking = not (kwargs.get("non_blocking") or (len(args) > 2 and args[2]))
                ours = [f for f in traceback.extract_stack() if "/fewstep/" in f.filename]
                where = f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "outside fewstep"
                self.copies.append((where, tuple(src.shape), blocking))
        return out


class CachedBatches:
    """`n` same-shape cached samples as `fewstep.step_context.next_batch` reads them: random latents and the family's
    own text embeddings of distinct prompts (encoded by its tiny encoders), and the empty prompt's."""

    def __init__(self, adapter, comps, latent_shape, n=8):
        g = torch.Generator().manual_seed(0)
        texts = adapter.split_cond(adapter.encode_prompts(comps, [f"prompt {i}" for i in range(n)]))
        self.rows = [(torch.randn(latent_shape, generator=g), t) for t in texts]
        self.uncond = adapter.split_cond(adapter.encode_prompts(comps, [""]))[0]

    def __len__(self):
        return len(self.rows)

    def item(self, i):
        return self.rows[i]


def tiny_step_context(family: str, device="cpu", batch_size=8, **cfg):
    """A StepContext as the trainer builds one, over the family's tiny model with a rank-4 LoRA (and TwinFlow's
    any-step embeddings when `twinflow_enabled`), called as through an engine, on `device` (meta: no values);
    fp32, one rank, CachedBatches for data. `cfg`: Config fields over these defaults."""
    from fewstep.config import Config
    from fewstep.data.order import DataOrder
    from fewstep.lora import prepare_trainable
    from fewstep.models import get_adapter
    from fewstep.step_context import StepContext

    adapter = get_adapter(family)
    comps = adapter.load(f"tiny:{family}")
    cfg = Config(**{"model_family": family, "pretrained_model_name_or_path": f"tiny:{family}", "model_type": "lora",
                    "lora_rank": 4, "lora_alpha": 4.0, "use_ema": False, "train_batch_size": batch_size,
                    "mixed_precision": "fp32", **cfg})
    model = comps.denoiser
    prepare_trainable(cfg, adapter, model, anystep_embeddings=cfg.twinflow_enabled)
    ds = CachedBatches(adapter, comps, adapter.encode_images(comps.vae, torch.zeros(1, 3, 32, 32)).shape[1:])
    return StepContext(cfg=cfg, adapter=adapter, engine=EngineWrapper(model.to(device)), dataset=ds,
                       order=DataOrder(len(ds), batch_size, 0, 1, seed=3), device=torch.device(device),
                       dtype=torch.float32)


def load_launcher(name: str):
    """launcher/<name>.py as a module (a script, not part of the package): its main(argv) runs in this process, the
    same code as the command without a new interpreter's imports (seconds each)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"fewstep_launcher_{name}", os.path.join(REPO, "launcher",
                                                                                           f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def system_packages_missing(packages: list[str], binaries: list[str]) -> str | None:
    """None once every one of `binaries` exists, installing the Debian `packages` first if needed (root and apt-get;
    one install at a time across the test workers: dpkg takes one); else why not. A failing apt-get raises: that is a
    broken machine, not a skip."""
    import fcntl
    from pathlib import Path

    if all(Path(b).exists() for b in binaries):
        return None
    if os.geteuid() != 0:
        return f"{', '.join(packages)} not installed, and installing them needs root"
    if shutil.which("apt-get") is None:
        return f"{', '.join(packages)} not installed, and apt-get is unavailable to install them"
    with open("/tmp/fewstep-tests-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be installing them right now
        if all(Path(b).exists() for b in binaries):
            return None
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *packages]):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd)}` failed (rc {r.returncode}): {r.stderr.strip()[-1000:]}")
    missing = [b for b in binaries if not Path(b).exists()]
    if missing:
        raise RuntimeError(f"installed {packages} but {missing} are still missing")
    return None
