"""Glance end to end on a tiny Flux: one command trains Slow and Fast, one pipeline samples with the hand-off."""
import json
import os

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from fewstep_testing import PY, read_metrics, run, write_config, write_dataset

SLOW = [1.0, 0.9869786, 0.9732042, 0.9586094, 0.9431188]
FAST = [0.9266473, 0.8257017, 0.6779868, 0.4411997, 0.0605503]


@pytest.fixture(scope="module")
def glance_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("glance")
    backend = write_dataset(str(root), n=1)
    library = root / "user_prompt_library.json"  # SimpleTuner's format; a nickname that is no file name
    library.write_text(json.dumps({"blue <sq>": "a blue square"}))
    cfg = write_config(str(root), backend, method="glance", glance_slow_timesteps=[t * 1000 for t in SLOW],
                       glance_fast_timesteps=",".join(str(s) for s in FAST), max_train_steps=4, train_batch_size=1,
                       flow_timesteps_mode="round-robin", validation_steps=0, user_prompt_library=str(library))
    run([PY, "launcher/train.py", "--config", cfg])
    return os.path.join(str(root), "out")


def test_one_command_trains_both_loras(glance_run):
    slow, fast = os.path.join(glance_run, "glance-slow"), os.path.join(glance_run, "glance-fast")
    for d, sig in ((slow, SLOW), (fast, FAST)):
        info = json.load(open(os.path.join(d, "fewstep_run.json")))
        assert info["sigmas"] == pytest.approx(sig)
    a = load_file(os.path.join(slow, "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(fast, "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k) and any(b[k].abs().sum() > 0 for k in b if "lora_B" in k)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in read_metrics(glance_run)] == list(range(1, 9))
    # round-robin: each phase's sigmas walk its list in order (batch 1, one rank): step k uses list[(k-1) % 5]
    means = [m["sigma_mean"] for m in read_metrics(glance_run)]
    assert means == pytest.approx(SLOW[:4] + FAST[:4], abs=1e-6)


def _pipe(adapter):
    comps = adapter.load("tiny:flux")
    return comps, adapter.build_pipeline(comps, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))


def test_a_resume_with_another_phase_length_is_refused_and_the_exports_stay(glance_run):
    """Raising max_train_steps on a finished Glance run would place its step-8 checkpoint (the trained Fast LoRA) in
    the Slow phase, train it on Slow's list and export it over Slow's: refused in one line before any training,
    and both exports stay as they were."""
    import subprocess

    from fewstep_testing import REPO, cpu_env

    exports = {d: open(os.path.join(glance_run, d, "pytorch_lora_weights.safetensors"), "rb").read()
               for d in ("glance-slow", "glance-fast")}
    cfg = os.path.join(os.path.dirname(glance_run), "config.json")
    proc = subprocess.run([PY, "launcher/train.py", "--config", cfg, "--resume_from_checkpoint", "latest",
                           "--max_train_steps", "20"], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("fewstep: ")]
    assert len(line) == 1 and "max_train_steps (Glance: per phase) 4 -> 20" in line[0], proc.stderr[-2000:]
    for d, data in exports.items():
        assert open(os.path.join(glance_run, d, "pytorch_lora_weights.safetensors"), "rb").read() == data, d


def test_a_preemption_before_the_fast_phases_first_step_keeps_slows_final_checkpoint(tmp_path):
    """Preempted at Fast's first step, which was skipped (a non-finite loss): the run stops without a save. The engine
    then holds Fast's fresh LoRA, and saving it as step 3 replaced Slow's final checkpoint with it (all-zero lora_B,
    no Adam state): a resume into another folder exported that as glance-slow."""
    backend = write_dataset(str(tmp_path), n=1)
    cfg = write_config(str(tmp_path), backend, method="glance", glance_slow_timesteps=[t * 1000 for t in SLOW],
                       glance_fast_timesteps=[t * 1000 for t in FAST], max_train_steps=3, train_batch_size=1)
    proc = run([PY, "launcher/train.py", "--config", cfg], FEWSTEP_FAULT_NAN_LOSS="4:0",
               FEWSTEP_FAULT_SIGNAL_AT_STEP="4")
    assert "preempted at step 3, before glance-fast's first step: nothing to save" in proc.stdout, proc.stdout[-3000:]
    ckpts = tmp_path / "out" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["latest", "step-3"]
    saved = torch.load(ckpts / "step-3" / "trainable.pt", weights_only=False)["params"]
    lora_b = [v["fp32"] for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # Slow's trained LoRA
    assert saved[next(iter(saved))].get("exp_avg") is not None  # with its Adam state


def test_one_pipeline_equals_hand_written_euler_with_switch(glance_run):
    from fewstep.models import get_adapter
    from fewstep.sampling import euler_loop, glance_pipeline_sample

    adapter = get_adapter("flux")
    comps, pipe = _pipe(adapter)
    cond = adapter.encode_prompts(comps, ["a red circle"])
    shape = adapter.encode_images(comps.vae, torch.zeros(1, 3, 32, 32)).shape
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    per_step = []

    out = glance_pipeline_sample(pipe, adapter.pipeline_prompt_kwargs(cond), os.path.join(glance_run, "glance-slow"),
                                 os.path.join(glance_run, "glance-fast"), SLOW, FAST, output_type="latent",
                                 **adapter.pipeline_latent_kwargs(comps, noise))
    got = adapter.latents_from_pipeline(out.images, *shape[-2:])
    # the schedule the pipeline actually used is exactly the training lists + 0 (no shift, no extra step)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(SLOW + FAST + [0.0], abs=1e-6)

    def model(x, s):
        return adapter.forward(pipe.transformer, x, s, cond)

    def switch(i):
        pipe.set_adapters("slow" if i < len(SLOW) else "fast")
        per_step.append(i)

    ref = euler_loop(model, noise, SLOW + FAST, on_step=switch)
    assert (got - ref).abs().max() < 1e-4
    # a second call with the folders loads them again (their names were taken), and gives the same image; the
    # adapters active before a call are active after it
    pipe.set_adapters("fast")
    again = glance_pipeline_sample(pipe, adapter.pipeline_prompt_kwargs(cond), os.path.join(glance_run, "glance-slow"),
                                   os.path.join(glance_run, "glance-fast"), SLOW, FAST, output_type="latent",
                                   **adapter.pipeline_latent_kwargs(comps, noise))
    assert torch.equal(adapter.latents_from_pipeline(again.images, *shape[-2:]), got)
    assert pipe.get_active_adapters() == ["slow"]  # load_glance_loras leaves Slow active
    seen = []  # the caller's own step callback runs at every step, after the switch (it was a duplicate keyword)

    def mine(p, i, t, kwargs):
        seen.append((i, p.get_active_adapters()))
        return kwargs
    glance_pipeline_sample(pipe, adapter.pipeline_prompt_kwargs(cond), None, None, SLOW, FAST, output_type="latent",
                           callback_on_step_end=mine, **adapter.pipeline_latent_kwargs(comps, noise))
    assert seen == [(i, ["slow" if i < len(SLOW) - 1 else "fast"]) for i in range(len(SLOW + FAST))]
    assert pipe.get_active_adapters() == ["slow"]
    pipe.set_adapters("fast")
    glance_pipeline_sample(pipe, adapter.pipeline_prompt_kwargs(cond), None, None, SLOW, FAST, output_type="latent",
                           **adapter.pipeline_latent_kwargs(comps, noise))
    assert pipe.get_active_adapters() == ["fast"]

    # each adapter acts only in its own phase: disabling one changes nothing before/after the boundary
    def run_with(active):
        def on(i):
            name = "slow" if i < len(SLOW) else "fast"
            if name in active:
                pipe.enable_lora()
                pipe.set_adapters(name)
            else:
                pipe.disable_lora()
        traj = []
        euler_loop(lambda x, s: (traj.append(x.clone()), model(x, s))[1], noise, SLOW + FAST, on_step=on)
        pipe.enable_lora()
        return traj
    both, only_slow, only_fast = run_with({"slow", "fast"}), run_with({"slow"}), run_with({"fast"})
    k = len(SLOW)
    assert all(torch.equal(a, b) for a, b in zip(both[:k + 1], only_slow[:k + 1]))  # Fast off: Slow phase unchanged
    assert not torch.equal(both[-1], only_slow[-1])  # ... but the Fast phase changes
    assert not torch.equal(both[k], only_fast[k])  # Slow off: the hand-off point changes


def test_schedule_errors(glance_run):
    from fewstep.models import get_adapter
    from fewstep.sampling import glance_pipeline_sample

    adapter = get_adapter("flux")
    comps, pipe = _pipe(adapter)
    kw = adapter.pipeline_prompt_kwargs(adapter.encode_prompts(comps, ["x"]))
    s, f = os.path.join(glance_run, "glance-slow"), os.path.join(glance_run, "glance-fast")
    with pytest.raises(ValueError, match="must equal the Slow\\+Fast list length"):
        glance_pipeline_sample(pipe, kw, s, f, SLOW, FAST, num_inference_steps=8)
    with pytest.raises(ValueError, match="above every Fast one"):
        glance_pipeline_sample(pipe, kw, s, f, SLOW, [0.99, 0.5])
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shifting in ({"shift": 3.0}, {"use_dynamic_shifting": True}, {"shift_terminal": 0.02},
                     {"use_karras_sigmas": True}, {"invert_sigmas": True}):  # e.g. a stock FLUX / Qwen-Image scheduler
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(**shifting)  # custom sigmas: the lists would not be used
        with pytest.raises(ValueError, match="shifts the sigmas it is given"):
            glance_pipeline_sample(pipe, kw, s, f, SLOW, FAST)


def test_sample_cli_writes_png(glance_run, tmp_path):
    out = tmp_path / "g.png"
    run([PY, "launcher/sample.py", "--method", "glance", "--slow", os.path.join(glance_run, "glance-slow"),
         "--fast", os.path.join(glance_run, "glance-fast"), "--prompt", "a red circle", "--seed", "3",
         "--output", str(out)])
    from PIL import Image
    assert Image.open(out).size == (32, 32)


def test_fast_phase_validation_is_the_chained_image(glance_run, tmp_path):
    """The Fast phase's validation image is what inference makes from the two exports (Slow's list, then Fast's from
    where Slow stopped: launcher/sample.py, same seed and prompt), not Fast run from pure noise; so is that of the
    user_prompt_library's prompt, from its own hand-off."""
    import numpy as np
    from PIL import Image

    def pixels(path):
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)

    val = os.path.join(glance_run, "validation")
    for prompt, suffix in (("a blue square", "-blue_sq"), ("a red circle", "")):
        out = tmp_path / f"chained{suffix}.png"
        run([PY, "launcher/sample.py", "--method", "glance", "--slow", os.path.join(glance_run, "glance-slow"),
             "--fast", os.path.join(glance_run, "glance-fast"), "--prompt", prompt, "--seed", "0",
             "--output", str(out)])
        fast = pixels(os.path.join(val, f"glance-fast-step000008{suffix}.png"))
        assert np.abs(fast - pixels(out)).max() <= 1  # 8-bit rounding of two code paths
        assert os.path.exists(os.path.join(val, f"glance-slow-handoff{suffix}.safetensors"))

    from fewstep.models import get_adapter
    from fewstep.sampling import load_glance_loras

    adapter = get_adapter("flux")
    comps, pipe = _pipe(adapter)
    load_glance_loras(pipe, os.path.join(glance_run, "glance-slow"), os.path.join(glance_run, "glance-fast"))
    at_boundary = {}

    def switch(p, i, t, kwargs):  # after Slow's last step: what the stock pipeline hands to Fast
        if i == len(SLOW) - 1:
            at_boundary["x"] = kwargs["latents"].clone()
            p.set_adapters("fast")
        return kwargs

    handoff = load_file(os.path.join(val, "glance-slow-handoff.safetensors"))["latents"]
    noise = torch.randn(handoff.shape, generator=torch.Generator().manual_seed(0))  # validation_seed 0
    prompt = adapter.pipeline_prompt_kwargs(adapter.encode_prompts(comps, ["a red circle"]))
    pipe(**prompt, **adapter.pipeline_latent_kwargs(comps, noise), sigmas=SLOW + FAST,
         num_inference_steps=len(SLOW + FAST), callback_on_step_end=switch, output_type="latent")
    stock = adapter.latents_from_pipeline(at_boundary["x"], *handoff.shape[-2:])
    torch.testing.assert_close(handoff, stock, rtol=0, atol=1e-4)

    pipe.unload_lora_weights()  # what the Fast phase's validation was before: Fast alone from pure noise
    pipe.load_lora_weights(os.path.join(glance_run, "glance-fast"))
    alone = pipe(**prompt, **adapter.pipeline_latent_kwargs(comps, noise), sigmas=FAST,
                 num_inference_steps=len(FAST)).images[0]
    assert np.abs(fast - np.asarray(alone, dtype=np.float64)).max() > 5  # the image comparison can tell them apart


def test_seed_two_pipeline_snippet_runs_against_our_loras(glance_run):
    """The seed document's snippet (two pipelines, prompt strings), pointed at the tiny model and our LoRAs."""
    from diffusers import FluxPipeline
    from fewstep.models.tiny import ensure_tiny_pipeline

    base_model = str(ensure_tiny_pipeline("flux"))
    slow_sigmas = [t / 1000.0 for t in (1000.0, 986.9786, 973.2042, 958.6094, 943.1188)]
    fast_sigmas = [t / 1000.0 for t in (926.6473, 825.7017, 677.9868, 441.1997, 60.5503)]
    generator = torch.Generator(device="cpu").manual_seed(0)
    pipe = FluxPipeline.from_pretrained(base_model, torch_dtype=torch.float32)
    pipe.load_lora_weights(os.path.join(glance_run, "glance-slow"))
    latents = pipe(prompt="your prompt", num_inference_steps=len(slow_sigmas), sigmas=slow_sigmas, height=32,
                   width=32, output_type="latent", generator=generator).images
    pipe_fast = FluxPipeline.from_pretrained(base_model, torch_dtype=torch.float32)
    pipe_fast.load_lora_weights(os.path.join(glance_run, "glance-fast"))
    image = pipe_fast(prompt="your prompt", num_inference_steps=len(fast_sigmas), sigmas=fast_sigmas, height=32,
                      width=32, latents=latents, guidance_scale=1.0, generator=generator).images[0]
    assert image.size == (32, 32)


def test_the_trainer_warns_when_flux_gets_qwen_image_lists(tmp_path, capsys):
    """SimpleTuner's GLANCE.md gives FLUX users Qwen-Image's lists: the trainer's phases say so on rank 0 (and train
    on them: a warning, as a user may mean it), and stay silent for FLUX's own lists and on other ranks."""
    from fewstep.config import load_config
    from fewstep.engine.distributed import DistInfo
    from fewstep.steps import build_phases

    qwen_slow = "1000.0,979.1915,957.5157,934.9171,911.3354"
    backend = write_dataset(str(tmp_path), n=1)
    main, other = DistInfo(0, 2, 0, torch.device("cpu")), DistInfo(1, 2, 1, torch.device("cpu"))
    own_fast = [880.0, 600.0, 300.0, 50.0]  # no paper list (and below Qwen-Image's Slow list, as Glance needs)
    cfg = load_config(write_config(str(tmp_path), backend, method="glance", glance_slow_timesteps=qwen_slow,
                                   glance_fast_timesteps=own_fast))
    phases = build_phases(cfg, main)
    out = capsys.readouterr().out
    assert "warning: 'glance_slow_timesteps': this is Qwen-Image's Slow list" in out and "986.9786" in out
    assert "glance_fast_timesteps" not in out and phases[0].sigmas[1] == pytest.approx(0.9791915)
    build_phases(cfg, other)
    cfg = load_config(write_config(str(tmp_path), backend, method="glance", glance_slow_timesteps=SLOW,
                                   glance_fast_timesteps=FAST))
    build_phases(cfg, main)
    assert capsys.readouterr().out == ""
