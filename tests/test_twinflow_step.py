"""fewstep.twinflow_step: the rule that decides whether TwinFlow's teacher passes may run on a sub-batch, and that the
config option reaches the loss."""
from types import SimpleNamespace

import pytest
import torch

from fewstep.lora import prepare_trainable
from fewstep.models import get_adapter
from fewstep.twinflow_step import has_dropout, make_twinflow_step
from fewstep_testing import HostToDeviceCopies, tiny_step_context

TWINFLOW = dict(twinflow_enabled=True, twinflow_allow_no_ema_teacher=True, twinflow_adversarial_enabled=True,
                twinflow_estimate_order=2)


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_only_a_dropout_that_drops_keeps_the_teacher_on_the_whole_batch(family):
    """diffusers' denoisers carry Dropout(p=0) layers (no reason to run the whole batch); LoRA dropout > 0 draws
    masks, which a sub-batch would draw differently from the student pass that the teacher passes replay."""
    for dropout, want in ((0.0, False), (0.1, True)):
        adapter = get_adapter(family)
        model = adapter.load(f"tiny:{family}", with_text=False, with_vae=False).denoiser
        cfg = SimpleNamespace(model_type="lora", gradient_checkpointing=False, lora_rank=4, lora_alpha=4.0,
                              lora_dropout=dropout, lora_init_type="default",
                              lora_targets=None, lora_export_formats=["diffusers"])
        prepare_trainable(cfg, adapter, model, anystep_embeddings=family == "flux")
        assert has_dropout(model) is want


def test_lora_never_wraps_the_anystep_layers():
    """The any-step embeddings train in full; a LoRA target naming one of their layers is refused (wrapped, it gave
    anystep_embeddings.safetensors peft's key names, which load_anystep could not read)."""
    from fewstep.config import ConfigError

    adapter = get_adapter("flux")
    model = adapter.load("tiny:flux", with_text=False, with_vae=False).denoiser
    cfg = SimpleNamespace(model_type="lora", gradient_checkpointing=False, lora_rank=4, lora_alpha=4.0,
                          lora_dropout=0.0, lora_init_type="default",
                          lora_targets=["to_q", "tt_linear_1"], lora_export_formats=["diffusers"])
    with pytest.raises(ConfigError, match="no module of FluxTransformer2DModel is named 'tt_linear_1'"):
        prepare_trainable(cfg, adapter, model, anystep_embeddings=True)
    cfg.lora_targets = ["to_q"]
    model = adapter.load("tiny:flux", with_text=False, with_vae=False).denoiser
    prepare_trainable(cfg, adapter, model, anystep_embeddings=True)
    assert not [n for n, _ in model.anystep_embed.named_modules() if "lora" in n]
    assert all(p.requires_grad for p in model.anystep_embed.parameters())
    # a LoRA on the time embedding the any-step embedding takes its width from (SDXL's time_embedding.linear_2)
    sdxl = get_adapter("sdxl")
    unet = sdxl.load("tiny:sdxl", with_text=False, with_vae=False).denoiser
    width = unet.time_embedding.linear_2.out_features
    cfg.lora_targets = ["to_q", "time_embedding.linear_2"]
    prepare_trainable(cfg, sdxl, unet, anystep_embeddings=True)
    assert unet.anystep_embed.tt_linear_2.out_features == width


def test_every_kind_of_dropout_layer_counts():
    for layer, want in ((torch.nn.Dropout2d(0.1), True), (torch.nn.AlphaDropout(0.2), True),
                        (torch.nn.Dropout(0.0), False), (torch.nn.Identity(), False)):
        assert has_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), layer)) is want


def _rows_per_pass(teacher_rows: str, lora_dropout: float) -> list[int]:
    """The batch size of every model call in one TwinFlow micro-step (batch 8, order 2, adversarial branch on,
    the live student as teacher), built from a Config as the trainer builds it; same data, groups and times."""
    ctx = tiny_step_context("flux", **TWINFLOW, lora_dropout=lora_dropout, twinflow_teacher_rows=teacher_rows)
    seen = []
    ctx.engine.module.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs["hidden_states"].shape[0]),
                                                with_kwargs=True)
    torch.manual_seed(0)
    loss, _ = make_twinflow_step(ctx)(0)
    assert torch.isfinite(loss)
    return seen


def test_teacher_rows_option_reaches_the_loss():
    """The config's `twinflow_teacher_rows` (and the dropout rule) decide the rows the teacher passes run on in a
    micro-step: `used` makes the same passes on fewer rows than `all`; with LoRA dropout, `used` runs them all."""
    used, every = _rows_per_pass("used", 0.0), _rows_per_pass("all", 0.0)
    assert len(used) == len(every) >= 5  # every pass is made either way (ZeRO-3 gathers inside each forward)
    assert sum(used) < sum(every), (used, every)
    assert _rows_per_pass("used", 0.1) == every


def test_the_group_cycle_follows_the_checkpointed_data_order(monkeypatch):
    """At batch sizes below 4 the e2e/mul/any/adv groups cycle over micro-steps. The cycle's position is the data
    order's slot, which counts every micro-step (a skipped step's too) and is checkpointed: a resume continues the
    cycle where an unbroken run is. It was once rebuilt from the applied steps alone, so a run that had skipped a
    step resumed with other groups than the unbroken run."""
    import fewstep.twinflow_step as twinflow_step

    cycle = []
    real = twinflow_step.assign_groups
    monkeypatch.setattr(twinflow_step, "assign_groups", lambda b, micro, **kw: cycle.append(micro) or real(b, micro,
                                                                                                           **kw))
    ctx = tiny_step_context("flux", batch_size=1, **TWINFLOW)
    step = make_twinflow_step(ctx)
    step(0)
    step(0)
    resumed = tiny_step_context("flux", batch_size=1, **TWINFLOW)
    resumed.order.load_state_dict({**ctx.order.state_dict(), "slot": 7})  # 7 micro-steps taken, skipped ones too
    make_twinflow_step(resumed)(0)
    assert cycle == [0, 1, 7]


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen_image", "sdxl"])
def test_a_micro_step_never_waits_for_the_gpu(family):
    """A TwinFlow micro-step (batch, every pass through the family's real diffusers model, backward) only queues device
    work: on the meta device, where any read of a value raises, it completes, and no host->device copy waits for the
    device's queue (see HostToDeviceCopies). The one read, of the loss and the logged terms, is the trainer's, after
    backward (`fewstep.optimizer_step.read_numbers`)."""
    ctx = tiny_step_context(family, device="meta", **TWINFLOW)
    step = make_twinflow_step(ctx)
    step(0)[0].backward()  # warm-up: diffusers' Qwen-Image copies its RoPE tables to the device once, at the first call
    with HostToDeviceCopies() as copies:
        loss, terms = step(1)
        loss.backward()
    assert loss.device.type == "meta" and not copies.blocking, copies.blocking
    assert {k for k, v in terms.items() if isinstance(v, torch.Tensor)} >= {"l_base", "l_adv", "l_rectify"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU guard above runs everywhere)")
def test_a_micro_step_never_synchronises_on_cuda():
    """The same on a GPU, by CUDA itself: torch's sync debug mode raises at any synchronising call in the step."""
    ctx = tiny_step_context("flux", device="cuda", **TWINFLOW)
    step = make_twinflow_step(ctx)
    step(0)[0].backward()  # warm-up (first-call set-up may copy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = step(1)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("adversarial", [False, True])
def test_a_run_without_the_adversarial_branch_says_so(adversarial, capsys):
    """SimpleTuner's default leaves TwinFlow's self-adversarial branch off: such a run says at start-up that it trains
    RCGM with the CFG-enhanced target only."""
    ctx = tiny_step_context("flux", **{**TWINFLOW, "twinflow_adversarial_enabled": adversarial})
    make_twinflow_step(ctx)
    said = "twinflow_adversarial_enabled is false" in capsys.readouterr().out
    assert said is not adversarial


@pytest.mark.parametrize("batch_size, ema_decay", [(1, 1.0), (4, 0.99)])
def test_the_step_hands_the_loss_its_rectify_rows_and_a_frozen_teacher(batch_size, ema_decay, monkeypatch, capsys):
    """The trainer's step gives `twinflow_loss` L_rectify's divisor for its batch size (below the groups' cycle, the
    e2e rows a micro-step has on average; else None, the mean) and whether the EMA teacher is frozen (EMA decay 1:
    the CFG target's base is then the teacher's unconditional field), and says so at start-up."""
    import fewstep.twinflow_step as twinflow_step
    from fewstep.ema import EMA

    seen = {}

    def spy(student, teacher, x0, cond, uncond, **kw):
        seen.update(kw)
        return torch.zeros(()), {"times": (torch.zeros(1), torch.zeros(1))}

    monkeypatch.setattr(twinflow_step, "twinflow_loss", spy)
    ctx = tiny_step_context("flux", batch_size=batch_size, **{**TWINFLOW, "use_ema": True, "ema_decay": ema_decay})
    ctx.ema = EMA([p.detach() for p in ctx.engine.module.parameters() if p.requires_grad], ema_decay)
    make_twinflow_step(ctx)(0)
    assert seen["rectify_rows"] == (0.25 if batch_size == 1 else None)
    assert seen["frozen_teacher"] is (ema_decay == 1.0)
    assert ("CFG scale twinflow_enhanced_ratio (0.5)" in capsys.readouterr().out) is (ema_decay == 1.0)


def test_signed_times_reach_the_model_as_sigma_target_time_and_sign():
    """The method's signed (t, tt) become the model's inputs: sigma = |t|, tt = |tt| and sign(t), so a fake-trajectory
    row (-t, -tt) runs at the same sigma as a real one with the other sign embedding."""
    from fewstep.twinflow_step import any_step_model

    calls = []
    model = any_step_model(lambda x, t, cond, tt, sign: calls.append((t, tt, sign)) or x)
    model(torch.zeros(3, 2), torch.tensor([-0.3, 0.4, 1.0], dtype=torch.float64),
          torch.tensor([-0.3, 0.1, 0.0], dtype=torch.float64), None)
    (t, tt, sign), = calls
    assert t.tolist() == pytest.approx([0.3, 0.4, 1.0]) and tt.tolist() == pytest.approx([0.3, 0.1, 0.0])
    assert sign.tolist() == [-1.0, 1.0, 1.0]
