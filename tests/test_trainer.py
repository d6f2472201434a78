"""End-to-end single-process training through `python launcher/train.py` (the plain-python entry point)."""
import glob
import json
import os
import pathlib
import re
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from fewstep_testing import (PY, assert_resumed_run_matches, cpu_env, mount_small_disk, read_metrics, side_by_side,
                             write_config, write_dataset)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    return root, write_dataset(str(root), n=3)


def train(root, backend, name, env=None, expect_rc=0, output=None, **overrides):
    """Train into <root>/<name> and wait; returns that folder. Its config file is its own, so several trainings can
    run `side_by_side`. `output`: a list that gets the run's stdout + stderr."""
    out = os.path.join(str(root), name)
    overrides.setdefault("cache_dir", os.path.join(str(root), "cache"))  # shared: the cache's writes are atomic
    cfg_dir = os.path.join(str(root), "configs", name)
    os.makedirs(cfg_dir, exist_ok=True)
    cfg = write_config(cfg_dir, backend, output_dir=out, **overrides)
    proc = subprocess.run([PY, "launcher/train.py", "--config", cfg], cwd=os.path.dirname(os.path.dirname(__file__)),
                          env=cpu_env(**(env or {})), capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect_rc, proc.stderr[-5000:]
    if output is not None:
        output.append(proc.stdout + proc.stderr)
    return out


def lora(out):
    return load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("sampling", ["logit-normal", "glance-round-robin"])
def test_resume_after_crash_is_bit_exact(data, sampling):
    root, backend = data
    common = dict(max_train_steps=8, checkpointing_steps=2, lr_scheduler="cosine", lr_warmup_steps=2,
                  caption_dropout_probability=0.3, use_ema=True, ema_decay=0.9)
    if sampling == "glance-round-robin":  # the timestep cursor must be restored too (3 sigmas, batch 2: no cycle)
        common.update(flow_custom_timesteps="1000,979.1915,957.5157", flow_timesteps_mode="round-robin")
    straight, crashed = side_by_side(
        lambda: train(root, backend, f"straight-{sampling}", **common),
        lambda: train(root, backend, f"crashed-{sampling}", expect_rc=17, **common,  # a random draw inside a save
                      env={"FEWSTEP_FAULT_AFTER_STEP": "5", "FEWSTEP_TEST_RNG_DRAW": "deepspeed-save"}))  # not kept
    assert [m["step"] for m in read_metrics(crashed)] == [1, 2, 3, 4, 5]
    train(root, backend, f"crashed-{sampling}", resume_from_checkpoint="latest", **common)
    wa = assert_resumed_run_matches(straight, crashed, 8, lora)
    ema = lora(os.path.join(straight, "ema"))  # the EMA export: same keys, lagging the final weights
    assert ema.keys() == wa.keys() and any(not torch.equal(ema[k], wa[k]) for k in wa)
    assert any(ema[k].abs().sum() > 0 for k in ema if "lora_B" in k)
    resumed_ema = lora(os.path.join(crashed, "ema"))  # the EMA (shadow and decay warm-up) is restored exactly too
    assert resumed_ema.keys() == ema.keys() and all(torch.equal(ema[k], resumed_ema[k]) for k in ema)


def test_kill_during_save_keeps_last_checkpoint(data):
    root, backend = data
    common = dict(max_train_steps=6, checkpointing_steps=2)
    out, straight = side_by_side(
        lambda: train(root, backend, "killsave", env={"FEWSTEP_FAULT_IN_SAVE": "4"}, expect_rc=17, **common),
        lambda: train(root, backend, "killsave-ref", **common))
    ckpts = os.path.join(out, "checkpoints")
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step-2"
    assert not os.path.exists(os.path.join(ckpts, "step-4"))
    log = []
    train(root, backend, "killsave", resume_from_checkpoint="latest", output=log, **common)
    assert [m["loss"] for m in read_metrics(out)] == [m["loss"] for m in read_metrics(straight)]
    assert "the data differ" not in log[0]  # the same data: no warning (the next test changes them)
    assert sorted(os.listdir(ckpts)) == ["latest", "step-2", "step-4", "step-6"]


def test_a_resume_says_when_the_data_changed_since_its_checkpoint(tmp_path):
    """An image added to the folder between two runs: the resume trains on, and says which entry changed and how
    (the order continues from its saved positions, so it cannot draw what an uninterrupted run would have)."""
    backend = write_dataset(str(tmp_path), n=3)
    common = dict(checkpointing_steps=2, seed=5)
    train(tmp_path, backend, "grown", max_train_steps=2, **common)
    write_dataset(str(tmp_path), n=4)  # the same three images, and a fourth
    log = []
    train(tmp_path, backend, "grown", max_train_steps=3, resume_from_checkpoint="latest", output=log, **common)
    assert re.search(r"warning: the data differ from step-2's \(entry '[^']+': 3 -> 4 images\): the data order "
                     r"continues from its saved positions", log[0]), log[0][-3000:]
    # a checkpoint saved before data records: the one change fewstep made, a config's resolution no longer replacing
    # an entry's own (the entries here set 32). Which other changes are named (a seed, a batch, buckets...):
    # tests/data/test_record.py
    meta = os.path.join(tmp_path, "grown", "checkpoints", "step-3", "trainer.json")
    with open(meta) as fh:
        saved = json.load(fh)
    with open(meta, "w") as fh:
        json.dump({k: v for k, v in saved.items() if k != "data"}, fh)
    log.clear()
    train(tmp_path, backend, "grown", max_train_steps=4, resume_from_checkpoint="latest", resolution=48,
          output=log, **common)
    assert re.search(r"warning: the data differ from step-3's \(entry '[^']+': its own resolution 32, where the "
                     r"config's 48 replaced it before 2026-12-07\)", log[0]), log[0][-3000:]


def test_a_resume_from_an_earlier_step_saves_its_own_final_checkpoint(data):
    """Run A ends at step 4 (step-2, step-4 saved). Run B resumes from step-2: it names A's step-4 at the start,
    keeps it while it trains, and at its end writes its own step-4 in its place (it used to see step-4 on disk and
    save nothing: had B trained otherwise, A's weights would have stayed the run's final checkpoint)."""
    root, backend = data
    common = dict(max_train_steps=4, checkpointing_steps=2)
    out = train(root, backend, "rollback", **common)
    ckpts = os.path.join(out, "checkpoints")
    written = os.stat(os.path.join(ckpts, "step-4", "trainer.json")).st_mtime_ns
    log = []
    train(root, backend, "rollback", output=log, resume_from_checkpoint=os.path.join(ckpts, "step-2"), **common)
    assert "note: step-4 (later steps of an earlier run) are kept" in log[0]
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step-4"
    assert os.stat(os.path.join(ckpts, "step-4", "trainer.json")).st_mtime_ns != written  # B's own


@pytest.fixture(scope="module")
def stopped_in_save(data):
    """A run (checkpoints every 2 of 4 steps) sent SIGUSR1 while checkpoint step-2 is being saved; (folder, stdout)."""
    root, backend = data
    out = os.path.join(str(root), "stopped-in-save")
    cfg_dir = os.path.join(str(root), "configs", "stopped-in-save")
    os.makedirs(cfg_dir)
    cfg = write_config(cfg_dir, backend, output_dir=out, max_train_steps=4, checkpointing_steps=2,
                       cache_dir=os.path.join(str(root), "cache"))
    proc = subprocess.Popen([PY, "launcher/train.py", "--config", cfg], cwd=os.path.dirname(os.path.dirname(__file__)),
                            env=cpu_env(FEWSTEP_TEST_DELAY="checkpoint:3"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stdout:  # rank 0 sleeps inside the save, its files written, before it is made current
        lines.append(line)
        if "[test] rank 0 delayed" in line:
            proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 0, "".join(lines)[-3000:]
    return out, "".join(lines)


def test_a_signal_during_a_checkpoint_save_stops_the_run_right_after_it(stopped_in_save):
    """The signal is seen once the save is done: the run stops at step 2 (it trained step 3 and saved a second time,
    minutes for a large model, into the grace time before the SIGKILL)."""
    out, stdout = stopped_in_save
    assert "preempted (SIGUSR1) at checkpoint step-2; exiting" in stdout, stdout[-3000:]
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step-2"]


def test_a_resume_trains_with_this_runs_optimizer_settings(data, stopped_in_save):
    """Resumed with a lowered learning_rate and another weight decay (what a diverged run is told to do), it trains
    with them and says so: DeepSpeed's load had put the saved ones back, and the old rate trained on. Read back from
    the optimizer state of its final checkpoint (the param groups DeepSpeed steps) and from the logged rate."""
    root, backend = data
    log = []
    out = train(root, backend, "resumed-new-settings", output=log, max_train_steps=4, learning_rate=1e-4,
                adam_weight_decay=0.1, resume_from_checkpoint=os.path.join(stopped_in_save[0], "checkpoints", "step-2"))
    assert "learning_rate 0.001 -> 0.0001, adam_weight_decay 0.01 -> 0.1 since the checkpoint: this run's values " \
           "apply from step 3" in log[0], log[0][-3000:]
    assert [(m["step"], m["lr"]) for m in read_metrics(out)] == [(3, 1e-4), (4, 1e-4)]
    (optim,) = glob.glob(os.path.join(out, "checkpoints", "step-4", "state", "*optim_states.pt"))
    groups = torch.load(optim, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-4, 0.1)] * len(groups) and groups


def test_a_full_disk_at_the_final_checkpoint_still_exports_the_trained_weights(data):
    """The checkpoints folder (a small tmpfs) cannot take the run's final checkpoint: the run ends in one line, and
    the weights it trained are exported nonetheless (they were lost with the checkpoint, and the message said
    nothing was)."""
    root, backend = data
    out = os.path.join(str(root), "full-disk")
    if not mount_small_disk(pathlib.Path(out) / "checkpoints", "64k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        log = []
        train(root, backend, "full-disk", expect_rc=2, output=log, max_train_steps=2)
        said = [ln for ln in log[0].splitlines() if ln.startswith("fewstep: checkpoint step-2 was not started")]
        assert len(said) == 1, log[0][-3000:]
        assert "There is no earlier checkpoint there. Free some space and start the run again as it was started" \
               in said[0], said
        assert said[0].endswith(f"The weights trained to step 2 were exported nonetheless ({out})"), said
        exported = lora(out)
        assert exported and all(torch.isfinite(v).all() for v in exported.values())
    finally:
        subprocess.run(["umount", "-l", os.path.join(out, "checkpoints")])


def test_lora_export_loads_in_stock_pipeline_and_matches_engine_weights(data):
    """The exported LoRA, loaded with diffusers' load_lora_weights, reproduces the model DeepSpeed trained (read back
    independently from the ZeRO checkpoint with DeepSpeed's own zero_to_fp32 reader)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import LoraConfig
    from fewstep.models import get_adapter

    root, backend = data
    out = train(root, backend, "export", max_train_steps=3, checkpointing_steps=3, validation_steps=3)
    adapter = get_adapter("flux")
    comps = adapter.load("tiny:flux")
    pipe = adapter.build_pipeline(comps)
    pipe.load_lora_weights(out)
    ref = adapter.load("tiny:flux", with_text=False, with_vae=False).denoiser
    ref.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(adapter.default_lora_targets)))
    trained = get_fp32_state_dict_from_zero_checkpoint(os.path.join(out, "checkpoints", "step-3"), tag="state")
    missing, unexpected = ref.load_state_dict(trained, strict=False)
    assert not unexpected and not [k for k in missing if "lora" in k]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(adapter.encode_images(comps.vae, torch.rand(1, 3, 32, 32, generator=g) * 2 - 1).shape,
                    generator=g)
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        cond = adapter.collate_cond(adapter.split_cond(adapter.encode_prompts(comps, ["a red circle"])))
        a = adapter.forward(pipe.transformer, x, sigma, cond)
        b = adapter.forward(ref, x, sigma, cond)
        base = adapter.forward(adapter.load("tiny:flux", with_text=False, with_vae=False).denoiser, x, sigma, cond)
    assert (a - b).abs().max() < 1e-5
    assert (a - base).abs().max() > 1e-4  # the LoRA does change the output
    assert os.path.exists(os.path.join(out, "validation", "flow-step000003.png"))


def test_tensorboard_scalars_read_back(data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, backend = data
    out = train(root, backend, "tb", max_train_steps=3, validation_steps=2)
    acc = EventAccumulator(os.path.join(out, "logs"))
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/peak_mem_gb",
                "train/host_rss_gb"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3], tag
    metrics = read_metrics(out)
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    # host memory now, in GiB: a real process's size, at most its peak (on CPU peak_mem_gb is the peak RSS)
    assert all(0.1 < m["host_rss_gb"] < 64 for m in metrics)
    if not torch.cuda.is_available():
        assert all(m["host_rss_gb"] <= 1.01 * m["peak_mem_gb"] for m in metrics)  # (sampled at different times)
    assert "validation/flow" in tags["images"]


def test_full_finetune_exports_diffusers_model(data):
    from fewstep.models import get_adapter

    root, backend = data
    out = train(root, backend, "full", model_type="full", max_train_steps=2, learning_rate=1e-4)
    adapter = get_adapter("flux")
    tuned = adapter.denoiser_cls.from_pretrained(os.path.join(out, "transformer"))
    base = adapter.load("tiny:flux", with_text=False, with_vae=False).denoiser
    diffs = [(tuned.state_dict()[k] - v).abs().max().item() for k, v in base.state_dict().items()]
    assert max(diffs) > 0 and len(diffs) == len(tuned.state_dict())


def test_bad_data_fails_before_training_with_the_file_named(tmp_path):
    backend = write_dataset(str(tmp_path), n=1)
    (tmp_path / "images" / "extra.txt").write_text("no image for me")
    cfg = write_config(str(tmp_path), backend)
    proc = subprocess.run([PY, "launcher/train.py", "--config", cfg], cwd=os.path.dirname(os.path.dirname(__file__)),
                          env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "caption without an image" in proc.stderr and "extra.txt" in proc.stderr


def test_config_error_exit_code_and_message(tmp_path):
    backend = write_dataset(str(tmp_path), n=1)
    cfg = write_config(str(tmp_path), backend, lora_rnak=3)
    proc = subprocess.run([PY, "launcher/train.py", "--config", cfg], cwd=os.path.dirname(os.path.dirname(__file__)),
                          env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "did you mean 'lora_rank'" in proc.stderr


@pytest.mark.parametrize("family", ["sd3", "qwen_image"])
def test_other_families_train_and_export_loadable_lora(data, family):
    from fewstep.models import get_adapter

    root, backend = data
    out = train(root, backend, f"fam-{family}", model_family=family, pretrained_model_name_or_path=f"tiny:{family}",
                max_train_steps=2, validation_steps=2, cache_dir=os.path.join(str(root), f"cache-{family}"))
    assert len(read_metrics(out)) == 2
    adapter = get_adapter(family)
    pipe = adapter.build_pipeline(adapter.load(f"tiny:{adapter.family}"))
    pipe.load_lora_weights(out)
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    assert os.path.exists(os.path.join(out, "validation", "flow-step000002.png"))


def test_grad_norm_is_logged_in_every_layout(data):
    """The logged grad_norm is fewstep's own (pre-clipping, from the non-finite check): DeepSpeed keeps none at stage 0
    fp32, where 0.0 was logged, and it is the same gradient at stage 0 and 1."""
    root, backend = data
    z0, z1 = side_by_side(lambda: train(root, backend, "gn-z0", max_train_steps=2, zero_stage=0),
                          lambda: train(root, backend, "gn-z1", max_train_steps=2, zero_stage=1))
    n0, n1 = [m["grad_norm"] for m in read_metrics(z0)], [m["grad_norm"] for m in read_metrics(z1)]
    assert all(n > 0 for n in n0) and n0 == pytest.approx(n1, rel=1e-5), (n0, n1)


@pytest.mark.parametrize("method", ["flow", "twinflow"])
def test_gradient_checkpointing_gives_the_same_losses(data, method):
    """Step 2's loss follows step 1's gradients. TwinFlow: the recomputed blocks see the any-step embeddings' output
    of the pass they belong to (student, teacher, rectify), though that state is set only around each forward."""
    root, backend = data
    opts = dict(max_train_steps=2)
    if method == "twinflow":
        opts.update(twinflow_enabled=True, use_ema=True, ema_decay=0.9, twinflow_adversarial_enabled=True,
                    train_batch_size=4)
    a, b = side_by_side(lambda: train(root, backend, f"gc-off-{method}", **opts),
                        lambda: train(root, backend, f"gc-on-{method}", gradient_checkpointing=True, **opts))
    la, lb = [m["loss"] for m in read_metrics(a)], [m["loss"] for m in read_metrics(b)]
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)


def test_training_randomness_is_independent_of_non_training_work(data):
    """A rank's noise, timesteps, caption dropout and LoRA init come from one stream seeded from (seed, rank): random
    numbers drawn while scanning, caching, loading, validating, exporting (between Glance's phases too) or
    checkpointing (library initialisers, a cache fill only some runs do) leave the run bit-identical; so do
    nan_trace's hooks."""
    root, backend = data
    common = dict(method="glance", glance_slow_timesteps=[1000, 980], glance_fast_timesteps=[900, 500],
                  max_train_steps=2, caption_dropout_probability=0.3, checkpointing_steps=1, validation_steps=1)
    draws = {"FEWSTEP_TEST_RNG_DRAW": "scan,cache,load,validation,export,checkpoint"}
    plain, drawn = side_by_side(lambda: train(root, backend, "rng-plain", **common),
                                lambda: train(root, backend, "rng-drawn", env=draws, nan_trace=True, **common))
    assert [m["loss"] for m in read_metrics(drawn)] == [m["loss"] for m in read_metrics(plain)]
    assert len(read_metrics(plain)) == 4  # both phases trained
    for phase in ("glance-slow", "glance-fast"):
        a, b = lora(os.path.join(plain, phase)), lora(os.path.join(drawn, phase))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_trace_names_where_the_first_non_finite_value_appeared(data):
    """nan_trace: a skipped step's message says where it went non-finite (here the loss: every module output finite,
    the first non-finite gradient at the transformer's own output)."""
    root, backend = data
    text = []
    train(root, backend, "nan-trace", env={"FEWSTEP_FAULT_NAN_LOSS": "2:0"}, output=text, nan_trace=True,
          max_train_steps=3)
    assert ("step 2: non-finite loss and gradients (on some rank; here: loss); first non-finite here: forward: every "
            "module output finite; backward: first non-finite gradient at the output of (model) "
            "(FluxTransformer2DModel): update skipped") in text[0]


def _count_reads(monkeypatch) -> list:
    """Every read of a tensor's values into Python from now on: the shape of each `tolist`, the name of any other."""
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or tolist(self))
    for name in ("item", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, real=real, name=name: reads.append(name) or real(self))
    return reads


def test_logged_terms_are_read_from_the_device_in_one_copy(monkeypatch):
    """The loss and a method's device-side terms come back as floats, host numbers as they are, in their order, and
    with a single device->host read (one `tolist` of one stacked tensor, whatever the number of terms)."""
    from fewstep.optimizer_step import read_numbers

    reads = _count_reads(monkeypatch)
    out = read_numbers({"loss": torch.tensor(2.5), "n_e2e": 2.0, "l_adv": torch.tensor(0.25, dtype=torch.bfloat16),
                        "clamp_fraction": torch.tensor(0.125, dtype=torch.float64)})
    assert out == {"loss": 2.5, "n_e2e": 2.0, "l_adv": 0.25, "clamp_fraction": 0.125}
    assert list(out) == ["loss", "n_e2e", "l_adv", "clamp_fraction"] and reads == [(3,)]
    assert all(type(v) is float for v in out.values())


def test_an_optimizer_step_reads_the_device_once(monkeypatch):
    """Over gradient-accumulation micro-steps the losses and device-side terms are summed on the device and read once,
    at the end (one `tolist`); the result is the micro-average, and one non-finite loss makes the step non-finite."""
    from fewstep.optimizer_step import run_micro_steps

    class Engine:  # the two calls run_micro_steps makes of a DeepSpeed engine
        def backward(self, loss):
            loss.backward()

        def step(self):
            pass

    w = torch.nn.Parameter(torch.tensor(2.0))
    losses = [1.0, 2.0, float("nan")]
    step_fn = lambda micro: (w * losses[micro], {"l_adv": w.detach() * 0 + micro, "n_e2e": 2.0})  # noqa: E731
    reads = _count_reads(monkeypatch)
    logs, finite = run_micro_steps(Engine(), step_fn, 2, step=1, rank=0)
    assert logs == {"loss": 3.0, "l_adv": 0.5, "n_e2e": 2.0} and finite and reads == [(2,)]
    assert not run_micro_steps(Engine(), step_fn, 3, step=1, rank=0)[1]


def test_a_resume_from_an_earlier_step_never_prunes_its_own_past_for_the_abandoned_runs(data):
    """Run A keeps step-2 and step-4 (limit 2). Run B resumes from step-2 with checkpointing_steps 3, is stopped at
    step 3 and requeued (resume latest): it never re-saves step-4. Its final save at 6 keeps its own step-3 and
    leaves A's step-4 (from B's first start, recorded in step-3's trainer.json); counting step-4 as its past deleted
    step-3 and kept step-4."""
    root, backend = data
    common = dict(checkpoints_total_limit=2, validation_steps=0)
    out = train(root, backend, "abandoned", max_train_steps=4, checkpointing_steps=2, **common)
    ckpts = os.path.join(out, "checkpoints")
    assert sorted(d for d in os.listdir(ckpts) if d.startswith("step-")) == ["step-2", "step-4"]
    log = []
    train(root, backend, "abandoned", max_train_steps=3, checkpointing_steps=3,
          resume_from_checkpoint=os.path.join(ckpts, "step-2"), output=log, **common)
    assert "step-4 (later steps of an earlier run) are kept" in log[0]
    train(root, backend, "abandoned", max_train_steps=6, checkpointing_steps=3, resume_from_checkpoint="latest",
          **common)
    assert sorted(d for d in os.listdir(ckpts) if d.startswith("step-")) == ["step-3", "step-4", "step-6"]
    with open(os.path.join(ckpts, "latest")) as fh:
        assert fh.read().strip() == "step-6"


def test_a_config_in_simpletuners_spelling_trains_as_simpletuner_reads_it(tmp_path):
    """A config as SimpleTuner writes one: its newer option names, model_flavour, options that change nothing here,
    adamw_bf16, the polynomial schedule, a global resolution for the data entry that sets none, and a
    WIDTHxHEIGHT validation size. The run trains, says what it did not use, checkpoints and validates at the renamed
    intervals, follows the polynomial learning rate and renders the asked size."""
    import json

    from PIL import Image
    backend = write_dataset(str(tmp_path), n=2)
    own = {**json.load(open(backend))[0], "id": "own", "caption_strategy": "textfile"}  # 32 px
    bare = {k: v for k, v in own.items() if k not in ("resolution", "caption_strategy")}  # the config's stand in
    json.dump([own, {**bare, "id": "bare"}], open(backend, "w"))
    out = str(tmp_path / "out")
    cfg = {"--model_type": "lora", "--model_family": "flux", "--model_flavour": "dev",
           "--pretrained_model_name_or_path": "tiny:flux", "--data_backend_config": backend, "--output_dir": out,
           "--cache_dir": str(tmp_path / "cache"), "--resolution": 48, "--resolution_type": "pixel",
           "--minimum_image_size": 0, "--train_batch_size": 1, "--max_train_steps": 4, "--num_train_epochs": 0,
           "--checkpoint_step_interval": 2, "--validation_step_interval": 2, "--validation_resolution": "64x32",
           "--validation_num_inference_steps": 2, "--learning_rate": 1e-3, "--lr_scheduler": "polynomial",
           "--lr_end": 1e-5, "--lr_power": 0.5, "--optimizer": "adamw_bf16", "--mixed_precision": "fp32",
           "--lora_rank": 4, "--hub_model_id": "my-lora", "--push_to_hub": "false", "--disable_benchmark": "true",
           "--vae_batch_size": 4, "--grad_clip_method": "norm", "--report_to": "none"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run([PY, "launcher/train.py", "--config", str(path)], cwd=os.path.dirname(
        os.path.dirname(__file__)), env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = proc.stdout + proc.stderr
    assert "model_flavour dev not used: pretrained_model_name_or_path names the model (tiny:flux)" in log
    assert "optimizer adamw_bf16 trains as adamw" in log
    assert "| clip global norm 2 |" in log  # SimpleTuner's max_grad_norm for a config in its spelling, shown
    assert "SimpleTuner options with no effect in fewstep: hub_model_id (" in log and "disable_benchmark (" in log
    assert "data 'own': 2 images in 1 bucket(s) [32x32 x2]" in log  # an entry's own resolution wins
    assert "data 'bare': 2 images in 1 bucket(s) [48x48 x2]" in log
    said = {line.split("'")[1]: line for line in log.splitlines() if line.startswith("fewstep: data '")}
    assert "captions from .txt files (fewstep's default; SimpleTuner's is filename)" in said["bare"]
    assert "SimpleTuner's is filename" not in said["own"]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step-2", "step-4"]
    assert Image.open(os.path.join(out, "validation", "flow-step000002.png")).size == (64, 32)
    lrs = [m["lr"] for m in read_metrics(out)]  # step k trains at the rate after k - 1 steps: 1e-3 first
    assert lrs == pytest.approx([1e-5 + (1e-3 - 1e-5) * (1 - k / 4) ** 0.5 for k in (0, 1, 2, 3)], rel=1e-9)


def test_the_start_up_line_names_the_clipping_in_effect():
    """fewstep's default (the global norm to 1.0) and SimpleTuner's (each value to +-2.0) differ, and a config in the
    spelling both share gets fewstep's: the start-up line says which clipping trains."""
    from fewstep.config import load_config
    from fewstep.trainer import clipping

    base = {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux"}
    assert clipping(load_config(None, base)) == "global norm 1"
    assert clipping(load_config(None, {**base, "grad_clip_method": "value", "max_grad_norm": 2.0})) == \
        "each value to +-2"
    assert clipping(load_config(None, {**base, "max_grad_norm": 0})) == "off"


def test_grad_clip_method_value_clips_each_gradient_value(data):
    """grad_clip_method value (SimpleTuner's default) clips every gradient value to max_grad_norm before the step.
    With a limit of 1e-8 = adam_epsilon, Adam's first step moves each LoRA B weight (zero at the start) by exactly
    lr * 1e-8 / (1e-8 + 1e-8) = lr / 2 where its gradient is not zero. Without the clip (a run that ignored the
    option) each would move by about lr (|g| >> eps); clipped by the norm instead (to 1e-8 in all, each value its
    share), each by its own amount below lr / 2."""
    root, backend = data
    lr = 1e-3
    out = train(root, backend, "clip-value", max_train_steps=1, learning_rate=lr, grad_clip_method="value",
                max_grad_norm=1e-8, adam_epsilon=1e-8)
    b = torch.cat([v.flatten() for k, v in lora(out).items() if "lora_B" in k]).double()
    moved = b[b != 0].abs()
    assert len(moved) > 0.9 * len(b) and torch.allclose(moved, torch.full_like(moved, lr / 2), rtol=1e-4)


def test_a_failed_validation_keeps_its_steps_checkpoint(data):
    """With validation_steps == checkpointing_steps, the step's checkpoint is written before its validation: a
    validation that fails (here its folder cannot be made, a file has its name; a full disk or an out-of-memory decode
    alike) loses no training (it ran first and took the checkpoint down with it)."""
    root, backend = data
    out = os.path.join(str(root), "failed-validation")
    os.makedirs(out)
    open(os.path.join(out, "validation"), "w").close()
    output = []
    train(root, backend, "failed-validation", expect_rc=2, output=output, max_train_steps=3, checkpointing_steps=2,
          validation_steps=2)
    assert os.path.isdir(os.path.join(out, "checkpoints", "step-2")), output[0][-3000:]
    errors = [ln for ln in output[0].splitlines() if ln.startswith("fewstep:") and "validation image" in ln]
    assert len(errors) == 1 and "flow-step000002.png" in errors[0] and "resume_from_checkpoint latest" in errors[0]
    assert "Traceback" not in output[0]
