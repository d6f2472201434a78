"""Metrics on rank 0: a per-step JSONL log, TensorBoard and/or Weights & Biases scalars and images, the tqdm bar.

`report_to` picks the trackers (tensorboard, wandb, all, none). W&B runs under `wandb.init` in whatever mode its
environment says: `WANDB_MODE=offline` writes the run to `<dir>/wandb/offline-run-*/` for a later `wandb sync`,
with `<dir>` = `logging_dir` (default `output_dir/logs`) unless `WANDB_DIR` is set. The run id is kept in
`<output_dir>/logs/wandb-run-id`, so a resumed run continues the same W&B run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
import time
import uuid

from fewstep.paths import write_atomic

TRACKERS = ("tensorboard", "wandb")
# W&B captions for image tags (prefix match); SimpleTuner's TwinFlow guide marks the trajectory scatter so (debug only)
_CAPTIONS = {"twinflow/trajectories": "experimental/theory unverified: TwinFlow's sampled (|t|, tt, sign)"}


def log_main(is_main: bool, msg: str) -> None:
    """A `fewstep: ...` progress line on stdout, printed by rank 0 only (above the progress bar, if one is shown)."""
    if is_main:
        from tqdm.auto import tqdm
        tqdm.write(f"fewstep: {msg}", file=sys.stdout)
        sys.stdout.flush()


def quiet_library_bars() -> None:
    """Turn off diffusers' and transformers' own progress bars ("Loading weights", "Loading pipeline components")
    in this process: called on every rank but rank 0, whose bars stand for the job's (eight ranks' bars in one
    Slurm log, as lines of their own, say nothing more)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def trackers(report_to: str | None) -> set[str]:
    """'tensorboard' | 'wandb' | 'all' | 'none' | a comma list of trackers -> the set of trackers."""
    names = {s.strip().lower() for s in str(report_to or "none").split(",") if s.strip()}
    if "all" in names:
        return set(TRACKERS)
    return names - {"none"}


def report_to_problem(report_to: str | None) -> str | None:
    """Why `report_to` cannot be honoured here (None if it can): an unknown tracker, or wandb not installed."""
    unknown = trackers(report_to) - set(TRACKERS)
    if unknown:
        return f"'report_to' names unknown trackers {sorted(unknown)}; use tensorboard, wandb, all or none"
    if "wandb" in trackers(report_to) and importlib.util.find_spec("wandb") is None:
        return "'report_to' wandb needs the wandb package: pip install -r requirements.txt (or pip install wandb)"
    return None


def require_wandb_credentials(report_to: str | None) -> None:
    """Before any compute: online W&B needs credentials (WANDB_API_KEY, `wandb login`'s netrc entry), and without
    them `wandb.init` fails only after the data scan, the cache fill and the model load. Offline and disabled modes
    (WANDB_MODE, `wandb offline`) need none. Reads the local credentials only: no request reaches the server."""
    if "wandb" not in trackers(report_to):
        return
    import wandb

    from fewstep.errors import UserError

    if wandb.setup().settings.mode in ("offline", "dryrun", "disabled"):
        return
    try:
        found = wandb.login(verify=False, prompt=False)
    except Exception as e:  # a malformed WANDB_API_KEY
        raise UserError(f"report_to wandb: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not found:
        raise UserError("report_to wandb: no W&B credentials on this machine; log in (`wandb login` or "
                        "WANDB_API_KEY) or log offline with WANDB_MODE=offline (then `wandb sync`)")


def peak_memory_gb() -> float:
    """Peak GPU memory allocated since the last `MetricsLogger.restart_clock` (CUDA: the step's), or the process's
    peak resident set size so far (CPU), in GiB."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is KiB on Linux


def host_rss_gb() -> float | None:
    """This process's resident set size now (host memory), in GiB; None where /proc is not available."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
    except (OSError, ValueError, IndexError):
        return None


class MetricsLogger:
    """Rank 0's logger (`enabled` False elsewhere: every method is then a no-op apart from the timing).

    use_tensorboard: write TensorBoard events to `logging_dir`. wandb_init: keyword arguments for `wandb.init`
    (project, name, config); None: no W&B. `from_config` builds both from a Config."""

    def __init__(self, output_dir: str, logging_dir: str | None, enabled: bool, use_tensorboard: bool,
                 total_steps: int, start_step: int, desc: str = "train", wandb_init: dict | None = None):
        self.enabled = enabled
        self.jsonl = os.path.join(output_dir, "logs", "metrics.jsonl")
        self.writer = None
        self.wandb_run = None
        self.bar = None
        self._t = time.perf_counter()
        if not enabled:
            return
        os.makedirs(os.path.dirname(self.jsonl), exist_ok=True)
        logged_past = self._truncate(start_step)
        log_dir = logging_dir or os.path.join(output_dir, "logs")
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard drops the events an earlier attempt logged after the start step (logged again from here),
            # on a resume and on a fresh start over an attempt that saved no checkpoint alike
            self.writer = SummaryWriter(log_dir, purge_step=start_step + 1)
        if wandb_init is not None:
            # Steps logged past the checkpoint (a crash after it, or a resume from an earlier step) are logged again
            # from here. A resumed W&B run keeps the first value logged at a step and drops the new ones, so these
            # go to a new run, '<name>-from-<step>'.
            new_run = logged_past and start_step > 0
            if new_run:
                wandb_init = {**wandb_init, "name": f"{wandb_init['name']}-from-{start_step}"}
            self.wandb_run = _start_wandb(os.path.join(output_dir, "logs", "wandb-run-id"), log_dir, start_step,
                                          wandb_init, new_run=new_run)
        from tqdm.auto import tqdm
        # In a file (stderr redirected, a Slurm .out) the bar's `\r` redraws do not erase: there it prints a line at
        # most every 30 s instead, so the lines printed between (`log_main`'s) start lines of their own.
        lines = {} if sys.stderr.isatty() else dict(file=_LineStream(sys.stderr), mininterval=30, miniters=1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, **lines)

    @classmethod
    def from_config(cls, cfg, enabled: bool, total_steps: int, start_step: int, desc: str = "train"):
        """The logger `cfg.report_to` asks for (W&B project/run name from tracker_project_name/tracker_run_name)."""
        chosen = trackers(cfg.report_to)
        wandb_init = None
        if "wandb" in chosen:
            name = cfg.tracker_run_name or os.path.basename(os.path.normpath(cfg.output_dir))
            wandb_init = {"project": cfg.tracker_project_name, "name": name, "config": cfg.to_dict()}
        return cls(cfg.output_dir, cfg.logging_dir, enabled, "tensorboard" in chosen, total_steps, start_step,
                   desc=desc, wandb_init=wandb_init)

    def _truncate(self, start_step: int) -> bool:
        """At each start (a resume, or a fresh start over an earlier attempt's log), move the lines logged after
        `start_step` to `metrics.replaced-after-step-N.jsonl` beside it, so every step appears exactly once in
        metrics.jsonl and the abandoned run's curve stays readable (e.g. the divergence a rollback undoes). Lines that
        are no JSON object (the last one cut short by a full disk or a kill) are dropped. The moved lines are written
        first, then metrics.jsonl, each atomically: a kill between the two loses no line (the next start moves them
        again, into a second file). Returns whether any step past `start_step` had been logged."""
        if not os.path.exists(self.jsonl):
            return False
        keep, replaced = [], []
        with open(self.jsonl, errors="replace") as fh:
            for ln in fh:
                try:
                    row = json.loads(ln)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    line = ln if ln.endswith("\n") else ln + "\n"
                    (keep if row.get("step", 0) <= start_step else replaced).append(line)
        if replaced:
            write_atomic(replaced_metrics_path(self.jsonl, start_step), "".join(replaced))
        write_atomic(self.jsonl, "".join(keep))
        return bool(replaced)

    def log(self, step: int, scalars: dict, samples: int) -> None:
        now = time.perf_counter()
        scalars = {**scalars, "samples_per_s": samples / max(now - self._t, 1e-9), "peak_mem_gb": peak_memory_gb()}
        self._t = now
        if not self.enabled:
            return
        rss = host_rss_gb()  # rank 0's host memory (the rank that also decodes, exports and writes checkpoints)
        if rss is not None:
            scalars["host_rss_gb"] = rss
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(f"train/{k}", float(v), step)
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": float(v) for k, v in scalars.items()}, step=step)
        # the postfix first, drawn by the update (at the bar's interval; a refresh here would draw every step)
        self.bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}", lr=f"{scalars.get('lr', 0):.2e}",
                             refresh=False)
        self.bar.update(1)

    def restart_clock(self) -> None:
        """The next `log`'s samples/s and peak GPU memory count from here: not a checkpoint or validation run since
        the last step (its decode's peak would stay in every later step's)."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._t = time.perf_counter()

    def image(self, tag: str, image_hwc_uint8, step: int) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.add_image(tag, image_hwc_uint8, step, dataformats="HWC")
        if self.wandb_run is not None:
            import wandb

            caption = next((c for prefix, c in _CAPTIONS.items() if tag.startswith(prefix)), None)
            self.wandb_run.log({tag: wandb.Image(image_hwc_uint8, caption=caption)}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.finish()
            wandb.teardown()  # waits for wandb-core to write everything (finish alone can return before)
            self.wandb_run = None


class _LineStream:
    r"""The progress bar's stream where it is no terminal: each redraw (`\r` + bar) a line of its own, the erasures
    (`\r` + spaces) nothing, and a redraw of the line just printed nothing either (the bar's close redraws it: a
    run resumed at its end printed its bar twice). Anything else (encoding, fileno, ...) is the stream's."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line and line != self.last:
            self.last = line
            sys.stdout.flush()  # the lines printed before the bar's stay before it where both go to one file
            self.stream.write(line + "\n")
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _start_wandb(id_file: str, log_dir: str, start_step: int, init: dict, new_run: bool = False):
    """wandb.init for this run: a fresh id at step 0 (or with `new_run`), the recorded one, with the name it was
    started under ('<name>-from-<step>' after a resume that logged steps again), on resume (resume='allow')."""
    import wandb

    from fewstep.errors import UserError

    run_id = None
    if start_step > 0 and os.path.exists(id_file) and not new_run:
        with open(id_file) as fh:
            run_id, _, name = fh.read().strip().partition("\n")
        if run_id and name:
            init = {**init, "name": name}
    run_id = run_id or uuid.uuid4().hex[:8]
    kwargs = dict(init, id=run_id, resume="allow")
    if not os.environ.get("WANDB_DIR"):
        os.makedirs(log_dir, exist_ok=True)
        kwargs["dir"] = log_dir
    try:
        run = wandb.init(**kwargs)
    except Exception as e:  # no login in online mode, an unreachable server, a bad project name
        raise UserError(f"report_to wandb: wandb.init failed ({type(e).__name__}: {str(e).splitlines()[0]}); log "
                        "in (`wandb login` or WANDB_API_KEY) or log offline with WANDB_MODE=offline") from None
    with open(id_file, "w") as fh:
        fh.write(f"{run_id}\n{init.get('name') or ''}")
    return run


def replaced_metrics_path(jsonl: str, start_step: int) -> str:
    """A free name for the lines a start at `start_step` replaces: metrics.replaced-after-step-N.jsonl, then .1,
    .2, ... for a later start at the same step."""
    stem = os.path.join(os.path.dirname(jsonl), f"metrics.replaced-after-step-{start_step}")
    path, n = f"{stem}.jsonl", 0
    while os.path.exists(path):
        n += 1
        path = f"{stem}.{n}.jsonl"
    return path


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
