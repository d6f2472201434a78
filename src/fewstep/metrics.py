"""Metrics: TensorBoard scalars and images, a per-step JSONL log, and the tqdm progress bar (rank 0 only)."""
from __future__ import annotations

import json
import os
import resource
import time

import torch


def peak_memory_gb() -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak resident set size (CPU), in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is KiB on Linux


class MetricsLogger:
    def __init__(self, output_dir: str, logging_dir: str | None, enabled: bool, use_tensorboard: bool,
                 total_steps: int, start_step: int, desc: str = "train"):
        self.enabled = enabled
        self.jsonl = os.path.join(output_dir, "logs", "metrics.jsonl")
        self.writer = None
        self.bar = None
        self._t = time.perf_counter()
        if not enabled:
            return
        os.makedirs(os.path.dirname(self.jsonl), exist_ok=True)
        self._truncate(start_step)
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(logging_dir or os.path.join(output_dir, "logs"))
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def _truncate(self, start_step: int) -> None:
        """On resume, drop lines logged after the checkpoint so every step appears exactly once."""
        if not os.path.exists(self.jsonl):
            return
        with open(self.jsonl) as fh:
            keep = [ln for ln in fh if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
        with open(self.jsonl, "w") as fh:
            fh.writelines(keep)

    def log(self, step: int, scalars: dict, samples: int) -> None:
        now = time.perf_counter()
        scalars = {**scalars, "samples_per_s": samples / max(now - self._t, 1e-9), "peak_mem_gb": peak_memory_gb()}
        self._t = now
        if not self.enabled:
            return
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(f"train/{k}", float(v), step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}", lr=f"{scalars.get('lr', 0):.2e}")

    def image(self, tag: str, image_hwc_uint8, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image_hwc_uint8, step, dataformats="HWC")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def trajectory_scatter(times: list[tuple[float, float]], size: int = 256):
    """TwinFlow's sampled times as an HWC uint8 image: x = |t| (sigma), y = tt (target time, |tt|), colour = sign
    (blue: real trajectory t > 0, red: twin trajectory t < 0). Axes run 0..1; the diagonal tt = t is drawn grey."""
    import numpy as np
    from PIL import Image, ImageDraw

    pad = 16
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    span = size - 2 * pad
    d.rectangle((pad, pad, size - pad, size - pad), outline=(0, 0, 0))
    d.line((pad, size - pad, size - pad, pad), fill=(180, 180, 180))
    for t, tt in times:
        x = pad + abs(t) * span
        y = size - pad - abs(tt) * span
        colour = (200, 30, 30) if t < 0 else (30, 60, 200)
        d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    return np.asarray(im)
