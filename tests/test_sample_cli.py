"""launcher/sample.py: --device/--dtype/--offload on flux LoRA, TwinFlow (LoRA and full) and Glance outputs.

The outputs come from short trainings through launcher/train.py on tiny:flux (the flux LoRA for --method flow is the
Glance run's Slow LoRA: a plain flow-matching LoRA export, so one training fewer). Most checks call the CLI's `sample`
in-process (one import of diffusers for all of them); the exit status and the one-line errors are also checked on the
real command line. bf16 vs fp32 tolerance: the images (pixels scaled to [-1, 1]) differ by a relative norm
||bf16 - fp32|| / ||fp32|| of about 0.022 on these tiny models (measured for all three methods); the tests allow 0.05
and require a difference (a bf16 run that silently stayed in fp32 would match exactly).
"""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep_testing import PY, REPO, cpu_env, load_launcher, run, side_by_side, write_config, write_dataset

BF16_REL_TOL = 0.05
PROMPT = "a red circle"
TWO_RUN = {"slow": [1000, 950, 900], "fast": [700, 400]}


CLI = load_launcher("sample")


def _train(root, **overrides):
    backend = write_dataset(str(root), n=1 if overrides.get("method") == "glance" else 2)
    # on a GPU machine the trainer runs on it (cpu_env's DS_ACCELERATOR=cpu would not match its CUDA device)
    run([PY, "launcher/train.py", "--config", write_config(str(root), backend, **overrides)],
        DS_ACCELERATOR="cuda" if torch.cuda.is_available() else "cpu")
    return os.path.join(str(root), "out")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trained outputs by name (all trained at the first request): flow (a flux LoRA), twinflow (LoRA), twinflow_full,
    glance (Slow + Fast), two_slow and two_fast (Qwen-Image flow LoRAs on a Slow and a Fast list)."""
    recipes = {
        "twinflow": dict(twinflow_enabled=True, use_ema=True, ema_decay=0.99, twinflow_adversarial_enabled=True,
                         train_batch_size=1, max_train_steps=2, learning_rate=5e-3),
        "twinflow_full": dict(model_type="full", twinflow_enabled=True, use_ema=True, ema_decay=0.99,
                              train_batch_size=1, max_train_steps=1, learning_rate=1e-4),
        "glance": dict(method="glance", glance_slow_timesteps=[1000, 980, 960], glance_fast_timesteps=[900, 600, 300],
                       max_train_steps=2, train_batch_size=1),
        # SimpleTuner's two-run Glance on Qwen-Image: one flow LoRA per list (flow_custom_timesteps)
        **{f"two_{half}": dict(model_family="qwen_image", pretrained_model_name_or_path="tiny:qwenimage",
                               flow_custom_timesteps=TWO_RUN[half], max_train_steps=2, train_batch_size=1,
                               learning_rate=5e-2)
           for half in TWO_RUN},
    }
    done = {}

    def get(name):
        if name == "flow":
            return os.path.join(get("glance"), "glance-slow")
        if not done:  # all at once
            roots = {k: tmp_path_factory.mktemp(k) for k in recipes}
            done.update(zip(recipes, side_by_side(*(lambda k=k: _train(roots[k], **recipes[k]) for k in recipes))))
        return done[name]
    return get


def _method_args(runs, method):
    if method == "glance":
        out = runs("glance")
        return ["--method", "glance", "--slow", os.path.join(out, "glance-slow"), "--fast",
                os.path.join(out, "glance-fast")]
    return ["--method", method, "--lora", runs(method), "--steps", "1", "2"] if method == "twinflow" else \
        ["--method", method, "--lora", runs(method), "--steps", "3"]


def _sample(args, **kw):
    """Run the CLI's sample() in-process; returns (record, [images as float arrays in [-1, 1]])."""
    record = CLI.sample(CLI.build_parser().parse_args(["--prompt", PROMPT, *args]), **kw)
    return record, [np.asarray(Image.open(r["output"]), dtype=np.float64) / 127.5 - 1 for r in record["runs"]]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _randn_of_torch_before_2_13(monkeypatch):
    """torch.randn as torch < 2.13 draws on the CPU: bf16/fp16 normals from another stream than fp32's (the low 8
    bits of each word as the uniform), so a seed gives unrelated start noise in bf16. Emulated as the fp32 draw
    reversed and negated: the same distribution, other noise."""
    with torch.device("cpu"):  # torch caches its factory functions for device contexts at their first use: make it
        torch.empty(0)          # happen now, or the cache would hold this stand-in for good (and the real randn
    real = torch.randn          # would escape later `with torch.device("meta")` blocks, e.g. the memory planner's)

    def randn(*size, generator=None, dtype=None, device=None, **kw):
        if dtype in (torch.bfloat16, torch.float16) and torch.device(device or "cpu").type == "cpu":
            x = real(*size, generator=generator, dtype=torch.float32, device=device, **kw)
            return -x.flatten().flip(0).view(x.shape).to(dtype)
        return real(*size, generator=generator, dtype=dtype, device=device, **kw)
    monkeypatch.setattr(torch, "randn", randn)


@pytest.mark.parametrize("method", ["flow", "twinflow", "glance"])
def test_bf16_and_fp32_on_cpu_agree(runs, tmp_path, method, monkeypatch):
    """The same seed gives the same image in bf16 and fp32 (up to bf16 rounding), also under a torch whose CPU bf16
    normals are another stream than its fp32 ones (torch < 2.13, e.g. the first GPU check's 2.11)."""
    _randn_of_torch_before_2_13(monkeypatch)
    base = _method_args(runs, method)
    r32, im32 = _sample([*base, "--device", "cpu", "--dtype", "fp32", "--output", str(tmp_path / "a.png")])
    r16, im16 = _sample([*base, "--device", "cpu", "--dtype", "bf16", "--output", str(tmp_path / "b.png")])
    assert (r32["dtype"], r16["dtype"], r16["device"]) == ("fp32", "bf16", "cpu")
    assert [r["steps"] for r in r16["runs"]] == [r["steps"] for r in r32["runs"]]
    for a, b in zip(im16, im32):
        assert a.shape == (32, 32, 3)
        assert 0 < _rel(a, b) < BF16_REL_TOL, _rel(a, b)


def test_default_on_cpu_is_fp32_and_json_record(runs, tmp_path):
    """The real command line: defaults (cpu + fp32 without a GPU), --warmup, --json."""
    if torch.cuda.is_available():
        pytest.skip("checks the defaults without a GPU")
    out, rec = tmp_path / "tw.png", tmp_path / "tw.json"
    proc = run([PY, "launcher/sample.py", "--method", "twinflow", "--lora", runs("twinflow"), "--steps", "1", "2",
                "--prompt", PROMPT, "--warmup", "1", "--output", str(out), "--json", str(rec)])
    assert "No LoRA keys associated" not in proc.stderr + proc.stdout  # diffusers' text-encoder note: always true
    r = json.loads(rec.read_text())
    assert (r["device"], r["dtype"], r["offload"], r["warmup"]) == ("cpu", "fp32", "none", 1)
    assert [x["steps"] for x in r["runs"]] == [1, 2] and all(x["seconds"] > 0 for x in r["runs"])
    assert all(os.path.exists(x["output"]) for x in r["runs"]) and r["load_s"] > 0


def test_twinflow_noise_follows_the_seed(runs, tmp_path):
    """TwinFlow's stochastic steps (2 NFE and up) draw from --seed's generator, not the global RNG."""
    base = ["--method", "twinflow", "--lora", runs("twinflow"), "--steps", "2", "--device", "cpu"]
    torch.manual_seed(1)
    _, a = _sample([*base, "--output", str(tmp_path / "a.png")])
    torch.manual_seed(2)
    _, b = _sample([*base, "--output", str(tmp_path / "b.png")])
    _, c = _sample([*base, "--seed", "1", "--output", str(tmp_path / "c.png")])
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("method", ["twinflow", "glance"])
def test_model_offload_hooks_give_the_same_images(runs, tmp_path, method):
    """--offload model through accelerate's hooks (CPU as the execution device here): LoRAs, any-step embeddings and
    Glance's adapter switch survive the offloading, bit for bit."""
    base = [*_method_args(runs, method), "--device", "cpu", "--dtype", "bf16"]
    _, plain = _sample([*base, "--output", str(tmp_path / "a.png")])
    rec, hooked = _sample([*base, "--offload", "model", "--output", str(tmp_path / "b.png")], cpu_offload_hooks=True)
    assert rec["offload"] == "model"
    assert all(np.array_equal(a, b) for a, b in zip(plain, hooked))


def test_offload_on_cpu_is_a_noop_with_a_message(runs, tmp_path, capsys):
    rc = CLI.main(["--method", "flow", "--lora", runs("flow"), "--steps", "2", "--prompt", PROMPT, "--device", "cpu",
                   "--offload", "sequential", "--output", str(tmp_path / "a.png")])
    assert rc == 0 and os.path.exists(tmp_path / "a.png")
    assert "fewstep: --offload sequential does nothing on --device cpu" in capsys.readouterr().err


def test_stochastic_steps_draw_from_the_seed_where_the_pipeline_passes_generator_none():
    """SDXL's pipeline passes `generator=None` to every scheduler step that takes a generator (a partial's default
    generator was overridden by it, and the noise came from the global RNG); one the pipeline passes is used."""
    from fewstep.schedulers import TwinFlowScheduler

    def first_step(step_of, generator):
        sched = TwinFlowScheduler(num_train_timesteps=1000, stochastic_ratio=1.0, target_time="few")
        sched.set_timesteps(2)
        x, out = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
        return step_of(sched)(out, sched.timesteps[0], x, generator=generator).prev_sample

    def seeded(s):
        return torch.Generator().manual_seed(s)

    reference = first_step(lambda s: s.step, seeded(7))
    torch.manual_seed(123)  # the global RNG differs from --seed's generator
    assert torch.equal(first_step(lambda s: CLI.step_drawing_from(s, seeded(7)), None), reference)
    assert not torch.equal(first_step(lambda s: CLI.step_drawing_from(s, seeded(7)), seeded(8)), reference)


def test_flow_sampling_uses_the_runs_shift(runs, tmp_path):
    """`--method flow` samples on the schedule the run trained and validated with (its flow_schedule_shift), not
    on the unshifted one."""
    import shutil

    shifted = tmp_path / "shifted"
    shutil.copytree(runs("flow"), shifted)
    info = json.loads((shifted / "fewstep_run.json").read_text())
    assert info["config"]["flow_schedule_shift"] == 1.0
    info["config"]["flow_schedule_shift"] = 3.0
    (shifted / "fewstep_run.json").write_text(json.dumps(info))
    base = ["--method", "flow", "--steps", "3", "--device", "cpu"]
    _, plain = _sample([*base, "--lora", runs("flow"), "--output", str(tmp_path / "a.png")])
    _, three = _sample([*base, "--lora", str(shifted), "--output", str(tmp_path / "b.png")])
    assert np.abs(plain[0] - three[0]).mean() > 1e-3


def test_full_finetune_twinflow_finds_its_anystep_embeddings(runs, tmp_path):
    out = runs("twinflow_full")
    assert os.path.exists(os.path.join(out, "transformer", "anystep_embeddings.safetensors"))
    rec, ims = _sample(["--method", "twinflow", "--lora", out, "--steps", "1", "--device", "cpu", "--dtype", "bf16",
                        "--output", str(tmp_path / "a.png")])
    assert rec["dtype"] == "bf16" and ims[0].shape == (32, 32, 3)


def _error_line(capsys, rc):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("fewstep: "), err
    return err[0]


def test_unknown_dtype_on_the_command_line(runs):
    proc = subprocess.run([PY, "launcher/sample.py", "--method", "flow", "--lora", runs("flow"), "--prompt", "x",
                           "--dtype", "fp8"], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["fewstep: unknown dtype 'fp8': expected bf16, fp16 or fp32"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu(runs, capsys):
    rc = CLI.main(["--method", "flow", "--lora", runs("flow"), "--prompt", "x", "--device", "cuda"])
    assert "--device cuda needs a CUDA GPU" in _error_line(capsys, rc)


@pytest.mark.parametrize("method, argv, message", [
    ("glance", ["--device", "tpu"], "unknown device 'tpu'"),
    ("glance", ["--device", "cuda:64"], "cuda:64"),
    ("glance", ["--steps", "3"], "--steps for Glance must be the Slow+Fast list length, 6"),
    ("twinflow", ["--steps", "0"], "--steps: got 0, expected integers >= 1"),
    ("flow", ["--steps", "2", "-1"], "--steps: got -1, expected integers >= 1"),
    ("twinflow", ["--gap-end", "5"], "--gap-end: got 5.0, expected a number in [0, 0.999)"),
    ("twinflow", ["--gap-end", "nan"], "--gap-end: got nan, expected a number in [0, 0.999)"),
    ("twinflow", ["--stochastic-ratio", "-0.5"], "--stochastic-ratio: got -0.5, expected a number in [0, 1]"),
    ("twinflow", ["--stochastic-ratio", "2"], "--stochastic-ratio: got 2.0, expected a number in [0, 1]"),
    ("twinflow", ["--kumaraswamy", "1", "inf", "1"], "--kumaraswamy: got inf, expected three positive finite"),
    ("twinflow", ["--kumaraswamy", "1000", "1", "1"], "the TwinFlow sigma grid for 2 steps (gap end 0.6, "
                                                      "Kumaraswamy 1000 1 1) collapses"),
    ("flow", ["--resolution", "0"], "--resolution: got 0, expected a number of pixels from 1 to 8192"),
    ("twinflow", ["--resolution", "-32"], "--resolution: got -32, expected a number of pixels from 1 to 8192"),
    ("flow", ["--resolution", "100000"], "--resolution: got 100000, expected a number of pixels from 1 to 8192"),
    ("flow", ["--resolution", "3"], "--resolution: got 3, expected at least 4 (sides are a multiple of 4 for flux)"),
    ("flow", ["--seed", "-1"], "--seed: got -1, expected an integer from 0 to 2**64 - 1"),
    ("twinflow", ["--seed", str(2 ** 64)], f"--seed: got {2 ** 64}, expected an integer from 0 to 2**64 - 1"),
    ("flow", ["--warmup", "-1"], "--warmup: got -1, expected an integer >= 0"),
])
def test_bad_requests_end_in_one_line(runs, capsys, monkeypatch, method, argv, message):
    """Found before any model loads (--resolution against the model's multiple reads its VAE config only)."""
    from fewstep.models import FlowModelAdapter

    def load(*a, **kw):
        raise AssertionError("loaded a model for a request that cannot run")
    monkeypatch.setattr(FlowModelAdapter, "load", load)
    rc = CLI.main([*_method_args(runs, method), "--prompt", "x", *argv])
    assert message in _error_line(capsys, rc)


def test_resolution_rounds_down_to_the_model_multiple(runs, tmp_path, capsys):
    rec, ims = _sample(["--method", "flow", "--lora", runs("flow"), "--steps", "1", "--device", "cpu",
                        "--resolution", "22", "--output", str(tmp_path / "a.png")])
    assert rec["resolution"] == 20 and ims[0].shape == (20, 20, 3)
    assert "fewstep: --resolution 22 is not a multiple of 4: sampling at 20" in capsys.readouterr().err


def test_not_a_run_dir_and_missing_arguments(tmp_path, capsys):
    rc = CLI.main(["--method", "twinflow", "--lora", str(tmp_path), "--prompt", "x"])
    assert "has no fewstep_run.json" in _error_line(capsys, rc)
    rc = CLI.main(["--method", "flow", "--prompt", "x"])
    assert "--lora is required" in _error_line(capsys, rc)
    with pytest.raises(SystemExit) as exc:
        CLI.main(["--method", "flow", "--lora", str(tmp_path), "--prompt", "x", "--offload", "disk"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fewstep: argument --offload: invalid choice")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_sampling_with_and_without_offload(runs, tmp_path):
    """On a GPU: the default is cuda + bf16 (TwinFlow LoRA with its any-step embeddings, and Glance's switch), close to
    the CPU fp32 images from the same seed; model and sequential offload give the same images as plain placement."""
    for method in ("twinflow", "glance"):
        base = _method_args(runs, method)
        ref_rec, ref = _sample([*base, "--device", "cpu", "--dtype", "fp32", "--output", str(tmp_path / "ref.png")])
        rec, ims = _sample([*base, "--output", str(tmp_path / "gpu.png")])
        assert rec["device"].startswith("cuda") and rec["dtype"] == "bf16" and rec["peak_mem_gib"] > 0
        for a, b in zip(ims, ref):
            assert _rel(a, b) < BF16_REL_TOL, (method, _rel(a, b))
        for mode in ("model", "sequential"):
            orec, off = _sample([*base, "--offload", mode, "--output", str(tmp_path / f"{mode}.png")])
            assert orec["offload"] == mode
            for a, b in zip(off, ims):
                assert _rel(a, b) < 1e-2, (method, mode, _rel(a, b))


def test_twinflow_sampler_flags(runs, tmp_path):
    """--target-time / --stochastic-ratio / --gap-end / --kumaraswamy reach the scheduler; the defaults are the preset
    (an explicit preset gives the same image), other settings another image (bad values: test_bad_requests_...)."""
    from fewstep.schedulers.twinflow import twinflow_preset

    base = ["--method", "twinflow", "--lora", runs("twinflow"), "--steps", "2", "--device", "cpu"]
    p = twinflow_preset(2)
    explicit = ["--target-time", p["target_time"], "--stochastic-ratio", str(p["stochastic_ratio"]),
                "--kumaraswamy", *map(str, p["kumaraswamy"])]
    _, default = _sample([*base, "--output", str(tmp_path / "a.png")])
    _, same = _sample([*base, *explicit, "--output", str(tmp_path / "b.png")])
    assert np.array_equal(default[0], same[0])
    others = [*(["--target-time", t] for t in ("few", "any", "mul") if t != p["target_time"]), ["--gap-end", "0.2"],
              ["--kumaraswamy", "1.17", "0.8", "1.1"], ["--stochastic-ratio", "0.5" if p["stochastic_ratio"] != 0.5
                                                        else "0"]]
    for i, flags in enumerate(others):
        _, im = _sample([*base, *flags, "--output", str(tmp_path / f"o{i}.png")])
        assert not np.array_equal(im[0], default[0]), flags


def test_readmes_diffusers_snippet_runs_as_written(runs):
    """The README's TwinFlow sampling snippet (stock FluxPipeline + TwinFlowScheduler + the any-step embeddings), as
    written but for the LoRA folder, on the tiny pipeline the LoRA was trained on: it must run and use the trained
    any-step embeddings (it once skipped adding them and failed)."""
    import re

    from diffusers import FluxPipeline

    from fewstep.models.tiny import ensure_tiny_pipeline
    from fewstep.sampling import run_info

    with open(os.path.join(REPO, "README.md")) as fh:
        blocks = re.findall(r"```python\n(.*?)```", fh.read(), re.S)
    snippet = next(b for b in blocks if "FluxPipeline" not in b and "pipe.transformer" in b)
    run_dir = runs("twinflow")
    assert run_info(run_dir)["config"]["pretrained_model_name_or_path"] == "tiny:flux"
    scope = {"pipe": FluxPipeline.from_pretrained(str(ensure_tiny_pipeline("flux")))}
    exec(snippet.replace('"output/twinflow"', repr(run_dir)), scope)
    assert scope["image"].size == (256, 256)  # the tiny pipeline's default size
    embed = scope["pipe"].transformer.anystep_embed
    assert embed.sign_embed.weight.abs().sum() > 0  # the trained any-step weights, not the zero-initialised ones


def test_classifier_free_guidance(runs, tmp_path):
    """--cfg-scale: with the prompt itself as the negative, CFG is the conditional prediction (the same image as no
    CFG); with another negative the image changes. Off by default for FLUX (Qwen-Image's default is 5, as Glance's
    reference samples it), and always off by default for TwinFlow (its target distils the guidance)."""
    from fewstep.models import get_adapter

    base = [*_method_args(runs, "glance"), "--device", "cpu"]
    rec, plain = _sample([*base, "--output", str(tmp_path / "a.png")])
    assert rec["cfg_scale"] == 1.0
    _, same = _sample([*base, "--cfg-scale", "4", "--negative-prompt", PROMPT, "--output", str(tmp_path / "b.png")])
    rec, guided = _sample([*base, "--cfg-scale", "4", "--output", str(tmp_path / "c.png")])
    assert rec["cfg_scale"] == 4.0
    assert _rel(same[0], plain[0]) < 1e-6 and _rel(guided[0], plain[0]) > 0.05, (_rel(same[0], plain[0]),
                                                                                  _rel(guided[0], plain[0]))
    assert get_adapter("qwenimage").sample_cfg_scale == 5.0 and get_adapter("flux").sample_cfg_scale == 1.0
    rec, _ = _sample(["--method", "twinflow", "--lora", runs("twinflow"), "--steps", "1", "--device", "cpu",
                      "--output", str(tmp_path / "t.png")])
    assert rec["cfg_scale"] == 1.0


def test_the_ema_export_samples_like_the_main_one(runs, tmp_path):
    """<out>/ema holds the EMA's LoRA and any-step embeddings, with its own run info: sampled as <out> is."""
    out = runs("twinflow")
    info = json.loads(open(os.path.join(out, "ema", "fewstep_run.json")).read())
    assert info["ema"] is True and info["step"] == json.loads(open(os.path.join(out, "fewstep_run.json")).read())["step"]
    args = ["--method", "twinflow", "--steps", "1", "--device", "cpu"]
    _, main = _sample([*args, "--lora", out, "--output", str(tmp_path / "main.png")])
    _, ema = _sample([*args, "--lora", os.path.join(out, "ema"), "--output", str(tmp_path / "ema.png")])
    assert _rel(ema[0], main[0]) > 1e-3  # other weights (decay 0.99 over two steps), same seed and prompt


def test_two_run_glance_chains_and_one_half_samples_as_its_validation(runs, tmp_path, capfd, monkeypatch):
    """SimpleTuner's two-run Glance (a flow LoRA per list) chains with --method glance; one half alone (--method flow)
    takes its LoRA at its listed sigmas only and the base model at the other steps, as its run's validation did.
    Qwen-Image's pipeline is given no guidance_scale it would warn about (it is not guidance-distilled)."""
    import fewstep.sampling as sampling
    from fewstep.methods.glance import glance_schedule, listed_schedule
    from peft.tuners.tuners_utils import BaseTunerLayer

    slow, fast = runs("two_slow"), runs("two_fast")
    rec, chained = _sample(["--method", "glance", "--slow", slow, "--fast", fast, "--device", "cpu",
                            "--output", str(tmp_path / "g.png")])
    sigmas, _ = glance_schedule([t / 1000 for t in TWO_RUN["slow"]], [t / 1000 for t in TWO_RUN["fast"]])
    assert rec["runs"][0]["steps"] == len(sigmas) - 1 == 5
    assert "guidance_scale is passed" not in capfd.readouterr().err
    # a Fast run whose flow_custom_timesteps went down to 0 (SimpleTuner's key takes it): 0 is the end of sampling,
    # where no step is taken, so the chain is the same (it was refused: "the last Fast sigma must be > 0"); a list's
    # order does not matter either (it was refused: "must strictly decrease")
    import shutil

    to_zero = str(tmp_path / "fast-to-zero")
    shutil.copytree(fast, to_zero)
    info_path = os.path.join(to_zero, "fewstep_run.json")
    info = json.loads(open(info_path).read())
    info["sigmas"] = [0.0, *reversed(info["sigmas"])]
    open(info_path, "w").write(json.dumps(info))
    rec, same = _sample(["--method", "glance", "--slow", slow, "--fast", to_zero, "--device", "cpu",
                         "--output", str(tmp_path / "z.png")])
    assert rec["runs"][0]["steps"] == 5 and _rel(same[0], chained[0]) == 0
    assert "trained down to sigma 0, the end of sampling" in capfd.readouterr().err
    info["config"]["model_family"] = "flux"  # a Fast LoRA of another model (the Slow run's base is loaded)
    open(info_path, "w").write(json.dumps(info))
    with pytest.raises(sampling.SamplingError, match=f"--fast {to_zero} a flux one: a Glance pair's LoRAs share"):
        _sample(["--method", "glance", "--slow", slow, "--fast", to_zero, "--device", "cpu"])
    with pytest.raises(sampling.SamplingError, match=f"--slow {fast} and --fast {slow}"):  # the halves swapped
        _sample(["--method", "glance", "--slow", fast, "--fast", slow, "--device", "cpu"])

    # one half alone: which steps ran with the LoRA, seen from inside the transformer
    seen, bases, called, original = [], [], [], sampling.listed_pipeline_sample

    def spy(pipe, prompt_kwargs, listed, base, **kw):
        bases.append(list(base))
        kw["callback_on_step_end"] = lambda p, i, t, k: (called.append(i), k)[1]  # a caller's own, kept
        layer = next(m for m in pipe.transformer.modules() if isinstance(m, BaseTunerLayer))
        hook = pipe.transformer.register_forward_pre_hook(
            lambda mod, a, k: seen.append((float(k["timestep"].flatten()[0]), not layer.disable_adapters)),
            with_kwargs=True)
        try:
            return original(pipe, prompt_kwargs, listed, base, **kw)
        finally:
            hook.remove()

    monkeypatch.setattr(sampling, "listed_pipeline_sample", spy)
    _sample(["--method", "flow", "--lora", slow, "--steps", "4", "--cfg-scale", "1", "--device", "cpu",  # a call a step
             "--output", str(tmp_path / "s.png")])
    listed = [t / 1000 for t in TWO_RUN["slow"]]
    assert len(bases) == 1 and len(bases[0]) == 4  # the --steps grid (with the run's shift)
    expected, _ = listed_schedule(listed, bases[0])
    assert [round(t, 4) for t, _ in seen] == [round(s, 4) for s in expected[:-1]], seen  # Qwen's timestep: sigma
    assert [lora for _, lora in seen] == [round(s, 4) in listed for s in expected[:-1]], seen
    assert 0 < sum(lora for _, lora in seen) < len(seen)
    assert called == list(range(len(seen)))
