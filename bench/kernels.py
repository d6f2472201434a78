"""Benchmark the fused Triton kernels against torch eager (the references) and torch.compile of the references.

    python bench/kernels.py                                   # GPU: every kernel, 1M..256M elements
    python bench/kernels.py --sizes 16M 64M --kernels ema_flat rcgm_loss_fwd_bwd
    python bench/kernels.py --interpret-smoke                 # CPU: tiny sizes through the Triton interpreter

Per kernel and size: median time (triton.testing.do_bench, CUDA events), achieved GB/s counting the minimum bytes read
and written, that as a fraction of the device's copy bandwidth (a large device-to-device copy measured in the same run),
and the speed-up over torch eager and over torch.compile. Each row first checks the kernel against the reference.
Without CUDA it prints why and exits 0, unless --interpret-smoke (tiny sizes, wall-clock timer: not a performance
figure).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

KERNELS = ("ema_flat", "ema_list", "rcgm_substep", "rcgm_loss_fwd", "rcgm_loss_fwd_bwd")
DEFAULT_SIZES = ("1M", "4M", "16M", "64M", "256M")
SMOKE_SIZES = ("4K", "10K")
SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(s: str) -> int:
    s = s.strip().upper()
    try:
        return int(s[:-1]) * SUFFIX[s[-1]] if s[-1] in SUFFIX else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {s!r}: expected an integer with optional K/M/G suffix") from None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", type=parse_size, help="element counts, e.g. 1M 4M 64M (default 1M..256M)")
    ap.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    ap.add_argument("--ema-tensors", type=int, default=200, help="tensors in the ema_list case")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--interpret-smoke", action="store_true",
                    help="tiny sizes through the Triton interpreter on CPU, to prove the script runs")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# cases: each returns (bytes moved at minimum, {name: fn}, check) with fns "triton", "eager", optional "compile" and
# extra baselines; check() runs the kernel and the reference once on fresh copies and returns the relative error.


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def case_ema_flat(n, dev, args, K):
    import torch

    ema, p = torch.randn(n, device=dev), torch.randn(n, device=dev).bfloat16()
    ema_r = ema.clone()
    fns = {"triton": lambda: K.ema_update_triton_(ema, p, 0.99),
           "eager": lambda: K.ema_update_reference_(ema_r, p, 0.99)}
    if K.compile:
        f = K.compile(_ema_pure)
        fns["compile"] = lambda: f([ema_r], [p])

    def check():
        a, b = ema.clone(), ema.clone()
        K.ema_update_triton_(a, p, 0.9), K.ema_update_reference_(b, p, 0.9)
        return _rel(a, b)
    return n * (4 + 2 + 4), fns, check


def _ema_pure(ema, params):
    import torch

    torch._foreach_lerp_(ema, [q.float() for q in params], 0.01)


def case_ema_list(n, dev, args, K):
    import torch

    g = torch.Generator().manual_seed(0)
    w = torch.rand(args.ema_tensors, generator=g) ** 3 + 1e-3  # skewed sizes, like a model's parameters
    sizes = (w / w.sum() * n).long().clamp(min=1)
    sizes[0] += n - int(sizes.sum())
    ema = [torch.randn(int(s), device=dev) for s in sizes]
    params = [torch.randn(int(s), device=dev).bfloat16() for s in sizes]
    params32 = [q.float() for q in params]
    ema_r = [e.clone() for e in ema]
    fns = {"triton": lambda: K.ema_update_triton_(ema, params, 0.99),
           "eager": lambda: K.ema_update_reference_(ema_r, params, 0.99),
           "foreach_lerp_ fp32": lambda: torch._foreach_lerp_(ema_r, params32, 0.01)}
    if K.compile:
        f = K.compile(_ema_pure)
        fns["compile"] = lambda: f(ema_r, params)

    def check():
        a, b = [e.clone() for e in ema], [e.clone() for e in ema]
        K.ema_update_triton_(a, params, 0.9), K.ema_update_reference_(b, params, 0.9)
        return _rel(torch.cat(a), torch.cat(b))
    return n * (4 + 2 + 4), fns, check


def case_rcgm_substep(n, dev, args, K):
    import torch

    B = 8
    x, acc = torch.randn(B, n // B, device=dev), torch.randn(B, n // B, device=dev)
    F = torch.randn(B, n // B, device=dev).bfloat16()
    t0, t1 = torch.rand(B, device=dev) + 0.5, torch.rand(B, device=dev) * 0.5
    xr, ar = x.clone(), acc.clone()
    fns = {"triton": lambda: K.rcgm_substep_triton_(x, acc, F, t0, t1),
           "eager": lambda: K.rcgm_substep_reference_(xr, ar, F, t0, t1)}
    if K.compile:
        f = K.compile(K.rcgm_substep_reference_)
        fns["compile"] = lambda: f(xr, ar, F, t0, t1)

    def check():
        a, b = (x.clone(), acc.clone()), (x.clone(), acc.clone())
        K.rcgm_substep_triton_(*a, F, t0, t1), K.rcgm_substep_reference_(*b, F, t0, t1)
        return max(_rel(a[0], b[0]), _rel(a[1], b[1]))
    return B * (n // B) * (4 + 4 + 2 + 4 + 4), fns, check


def _loss_inputs(n, dev):
    import torch

    B = 8
    rnd = lambda dt: torch.randn(B, n // B, device=dev, dtype=dt)  # noqa: E731
    F = rnd(torch.bfloat16)
    acc, target = rnd(torch.float32), rnd(torch.float32)  # target: the (already CFG-enhanced) target E, as training
    t = torch.linspace(1.0, 0.3, B, device=dev)
    kw = dict(delta_t=0.01, clamp=1.0, sample_weight=torch.rand(B, device=dev) + 1.0)
    return B * (n // B), F, acc, target, t, 0.1 * t, kw


# bytes per element of the fused forward: F 2 + acc 4 + target 4 read, T 4 written (every row has t - tt >= delta_t)
LOSS_FWD_BYTES = 2 + 4 + 4 + 4


def case_rcgm_loss_fwd(n, dev, args, K):
    import torch

    m, F, acc, target, t, tt, kw = _loss_inputs(n, dev)
    fns = {"triton": lambda: K.rcgm_target_loss_triton(F, acc, target, t, tt, **kw),
           "eager": lambda: K.rcgm_target_loss_reference(F, acc, target, t, tt, **kw)}
    if K.compile:
        f = K.compile(K.rcgm_target_loss_reference)
        fns["compile"] = lambda: f(F, acc, target, t, tt, **kw)

    def check():
        (la, Ta), (lb, Tb) = fns["triton"](), fns["eager"]()
        return max(_rel(la, lb), _rel(Ta, Tb))
    return m * LOSS_FWD_BYTES, {k: _no_grad(torch, v) for k, v in fns.items()}, check


def _no_grad(torch, fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def case_rcgm_loss_fwd_bwd(n, dev, args, K):
    import torch

    m, F, acc, target, t, tt, kw = _loss_inputs(n, dev)
    F.requires_grad_(True)
    ones = torch.ones(F.shape[0], device=dev)

    def step(op):
        loss, _ = op(F, acc, target, t, tt, **kw)
        return torch.autograd.grad(loss, F, ones)[0]
    fns = {"triton": lambda: step(K.rcgm_target_loss_triton), "eager": lambda: step(K.rcgm_target_loss_reference)}
    if K.compile:
        f = K.compile(K.rcgm_target_loss_reference)
        fns["compile"] = lambda: step(f)
    # backward adds F 2 + T 4 read, dF 2 written
    return m * (LOSS_FWD_BYTES + 8), fns, lambda: _rel(fns["triton"](), fns["eager"]())


CASES = {"ema_flat": case_ema_flat, "ema_list": case_ema_list, "rcgm_substep": case_rcgm_substep,
         "rcgm_loss_fwd": case_rcgm_loss_fwd, "rcgm_loss_fwd_bwd": case_rcgm_loss_fwd_bwd}


# ----------------------------------------------------------------------------------------------------------------------


def make_timer(smoke: bool):
    """Median milliseconds of fn: CUDA-event timing via triton.testing.do_bench on GPU, perf_counter in smoke mode."""
    if smoke:
        def timer(fn):
            fn()
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(ts)
        return timer
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(timer, dev, smoke: bool) -> float:
    """GB/s of a large device-to-device copy (read + write), the practical ceiling for these streaming kernels."""
    import torch

    n = (1 << 16) if smoke else (1 << 28)  # 1 GiB of fp32 on GPU
    src, dst = torch.randn(n, device=dev), torch.empty(n, device=dev)
    ms = timer(lambda: dst.copy_(src))
    return 2 * 4 * n / ms / 1e6


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: set before importing them
        args.no_compile = True
    import torch

    if not args.interpret_smoke and not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device, skipping: kernel timings need a GPU "
              "(--interpret-smoke runs tiny sizes through the Triton interpreter to check the script).")
        return 0
    import fewstep.kernels.ema as kema
    import fewstep.kernels.rcgm as krcgm
    import fewstep.kernels.reference as kref

    class K:  # the functions under test, one namespace
        ema_update_triton_ = staticmethod(kema.ema_update_triton_)
        rcgm_substep_triton_ = staticmethod(krcgm.rcgm_substep_triton_)
        rcgm_target_loss_triton = staticmethod(krcgm.rcgm_target_loss_triton)
        ema_update_reference_ = staticmethod(kref.ema_update_reference_)
        rcgm_substep_reference_ = staticmethod(kref.rcgm_substep_reference_)
        rcgm_target_loss_reference = staticmethod(kref.rcgm_target_loss_reference)
        compile = None

    if not args.no_compile:
        for knob in ("recompile_limit", "cache_size_limit"):  # one compiled graph per size and grad mode
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        K.compile = staticmethod(lambda fn: torch.compile(fn, dynamic=False))

    dev = "cpu" if args.interpret_smoke else "cuda"
    sizes = args.sizes or [parse_size(s) for s in (SMOKE_SIZES if args.interpret_smoke else DEFAULT_SIZES)]
    timer = make_timer(args.interpret_smoke)
    if args.interpret_smoke:
        print("**Interpreter smoke run (CPU, TRITON_INTERPRET=1): not a performance figure.**\n")
    else:
        print(f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
              f"{__import__('triton').__version__}\n")
    bw = copy_bandwidth(timer, dev, args.interpret_smoke)
    print(f"Device-to-device copy bandwidth: {bw:.1f} GB/s (read + write)\n")
    print("| kernel | elements | rel err | Triton ms | GB/s | % copy BW | eager ms | x eager | compile ms | x compile "
          "| other baselines |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.kernels:
        for n in sizes:
            nbytes, fns, check = CASES[name](n, dev, args, K)
            err = check()
            ms = {k: timer(fn) for k, fn in fns.items()}
            gbs = nbytes / ms["triton"] / 1e6
            comp = ms.get("compile")
            comp_ms = "n/a" if comp is None else f"{comp:.3f}"
            comp_x = "n/a" if comp is None else f"{comp / ms['triton']:.2f}"
            other = ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items() if k not in ("triton", "eager", "compile"))
            print(f"| {name} | {n:,} | {err:.1e} | {ms['triton']:.3f} | {gbs:.1f} | {100 * gbs / bw:.0f}% "
                  f"| {ms['eager']:.3f} | {ms['eager'] / ms['triton']:.2f} | {comp_ms} | {comp_x} | {other or '-'} |",
                  flush=True)
            del fns
            if dev == "cuda":
                torch.cuda.empty_cache()
    if args.interpret_smoke:
        print("\nInterpreter timings are not kernel speed: not a performance figure.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
