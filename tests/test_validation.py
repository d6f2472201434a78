"""fewstep.validation: validation sampling (classifier-free guidance, Glance's chained lists) against stock
pipelines, decoding on the training device, and the Slow phase's hand-off."""
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from fewstep.models import get_adapter
from fewstep.step_context import StepContext
from fewstep.steps import Phase
from fewstep.validation import sample_latents
from fewstep.validation_settings import validation_cfg_scale
from fewstep_testing import EngineWrapper


def test_validation_guidance_rule():
    """SimpleTuner's meanings: for FLUX validation_guidance is the distilled-guidance value and validation_guidance_real
    the CFG scale; for the others validation_guidance is the CFG scale. TwinFlow: no CFG, the training value."""
    from fewstep.validation_settings import validation_distilled_guidance

    flux, qwen = get_adapter("flux"), get_adapter("qwen_image")
    cfg = SimpleNamespace(resolved_method="flow", validation_guidance=None, validation_guidance_real=None)
    assert validation_cfg_scale(cfg, flux) == 1.0 and validation_cfg_scale(cfg, qwen) == 5.0  # as sample.py
    assert validation_distilled_guidance(cfg, flux) is None  # the training value
    cfg.validation_guidance = 3.5
    assert validation_cfg_scale(cfg, flux) == 1.0 and validation_distilled_guidance(cfg, flux) == 3.5
    assert validation_cfg_scale(cfg, qwen) == 3.5 and validation_distilled_guidance(cfg, qwen) is None
    cfg.validation_guidance, cfg.validation_guidance_real = 0.0, 4.0  # SimpleTuner's TwinFlow recipe gives 0
    assert validation_cfg_scale(cfg, qwen) == 1.0 and validation_cfg_scale(cfg, flux) == 4.0
    cfg.resolved_method = "twinflow"
    cfg.validation_guidance = 4.0
    assert validation_cfg_scale(cfg, qwen) == validation_cfg_scale(cfg, flux) == 1.0
    assert validation_distilled_guidance(cfg, flux) is None


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_validation_guidance_is_the_pipelines_true_cfg(family):
    """A flow run's validation with a CFG scale of 3 makes the latents the family's pipeline makes with
    true_cfg_scale 3 and the same negative prompt (same noise, same sigmas): QwenImagePipeline's also rescales the
    guided velocity to the conditional one's norm, token by token. Guidance 1 makes other latents."""
    adapter = get_adapter(family)
    comps = adapter.load(f"tiny:{family}")
    cond, uncond = (adapter.encode_prompts(comps, [p]) for p in ("a red circle", ""))
    noise_shape = adapter.encode_images(comps.vae, torch.zeros(1, 3, 32, 32)).shape
    sigmas = [1.0, 0.75, 0.5, 0.25]

    def ours(scale):
        cfg = SimpleNamespace(resolved_method="flow", validation_guidance=None if family == "flux" else scale,
                              validation_guidance_real=scale if family == "flux" else None,
                              flux_guidance_value=None, validation_num_inference_steps=len(sigmas),
                              flow_schedule_shift=1.0, flow_schedule_auto_shift=False,  # the base schedule: sigmas
                              validation_resolution=None)
        ds = SimpleNamespace(validation_shape=lambda size: tuple(noise_shape[1:]))
        ctx = StepContext(cfg=cfg, adapter=adapter, engine=EngineWrapper(comps.denoiser), dataset=ds, order=None,
                          device=torch.device("cpu"), dtype=torch.float32)
        x, handoff = sample_latents(ctx, Phase("flow", 1, None), cond, torch.Generator().manual_seed(7), uncond)
        assert handoff is None
        return x

    pipe = adapter.build_pipeline(comps, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))
    noise = torch.randn(noise_shape, generator=torch.Generator().manual_seed(7))
    kwargs = {**adapter.pipeline_prompt_kwargs(cond, uncond), **adapter.pipeline_cfg_kwargs(3.0)}
    out = pipe(**kwargs, **adapter.pipeline_latent_kwargs(comps, noise), sigmas=sigmas, num_inference_steps=4,
               output_type="latent").images
    ref = adapter.latents_from_pipeline(out, *noise_shape[-2:])
    got = ours(3.0)
    assert (got - ref).norm() / ref.norm() < 1e-5
    assert (ours(1.0) - ref).norm() / ref.norm() > 1e-3


def test_a_list_trained_alone_validates_with_its_lora_only_at_its_sigmas():
    """A run on flow_custom_timesteps alone (one Glance half): the LoRA at the listed sigmas, the base model (LoRA
    off) on the base schedule above and below them."""
    from peft import LoraConfig

    adapter = get_adapter("flux")
    comps = adapter.load("tiny:flux")
    denoiser = comps.denoiser
    denoiser.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    cond = adapter.encode_prompts(comps, ["a red circle"])
    noise_shape = adapter.encode_images(comps.vae, torch.zeros(1, 3, 32, 32)).shape
    seen = []  # (timestep, LoRA on) of every denoiser call
    lora_layer = next(m for n, m in denoiser.named_modules() if n.endswith("to_q") and hasattr(m, "disable_adapters"))
    denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append((round(float(kw["timestep"][0]), 4),
                                                                     not lora_layer.disable_adapters)), with_kwargs=True)
    cfg = SimpleNamespace(resolved_method="flow", validation_guidance=None, validation_guidance_real=None,
                          flux_guidance_value=None, validation_num_inference_steps=4, flow_schedule_shift=1.0,
                          flow_schedule_auto_shift=False, validation_resolution=None)
    ds = SimpleNamespace(validation_shape=lambda size: tuple(noise_shape[1:]))
    ctx = StepContext(cfg=cfg, adapter=adapter, engine=EngineWrapper(denoiser), dataset=ds, order=None,
                      device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        sample_latents(ctx, Phase("flow", 1, [0.6, 0.55]), cond, torch.Generator().manual_seed(0))
    assert seen == [(1.0, False), (0.75, False), (0.6, True), (0.55, True), (0.5, False), (0.25, False)], seen


def test_validation_decodes_on_the_gpu_and_returns_the_vae_to_the_host(monkeypatch):
    """On a GPU run the VAE moves to the training device for the decode and back after (also when the decode runs
    out of memory: then it decodes on the host). CUDA is faked: the VAE records where it is sent."""
    from fewstep.validation import decode_on_device

    class VAE(torch.nn.Module):
        where = "cpu"

        def to(self, device, dtype=None):
            self.where = str(device)
            return self

    class Adapter:
        def __init__(self, oom_on_gpu):
            self.oom_on_gpu, self.decoded_on = oom_on_gpu, []

        def decode_latents(self, vae, latents):
            self.decoded_on.append(vae.where)
            if self.oom_on_gpu and vae.where != "cpu":
                raise torch.OutOfMemoryError("CUDA out of memory")
            return latents[:, :3] * 0.5

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    latents = torch.randn(1, 4, 8, 8)
    for oom, path in ((False, ["cuda"]), (True, ["cuda", "cpu"])):
        adapter, vae = Adapter(oom), VAE()
        pixels = decode_on_device(adapter, vae, latents, torch.device("cuda"))
        assert adapter.decoded_on == path and vae.where == "cpu"
        torch.testing.assert_close(pixels, latents[:, :3] * 0.5)
    adapter, vae = Adapter(False), VAE()
    decode_on_device(adapter, vae, latents, torch.device("cpu"))
    assert adapter.decoded_on == ["cpu"]


def test_lora_disabled_runs_the_base_model_and_restores_the_lora():
    """The Slow phase's validation runs Fast's list on the base model: with the LoRA off the output is the base's
    (the LoRA trained away from zero changes it), and after the block the LoRA acts again."""
    from peft import LoraConfig

    from fewstep.validation import lora_disabled

    adapter = get_adapter("flux")
    comps = adapter.load("tiny:flux", with_text=False)
    model = comps.denoiser
    x = torch.randn(adapter.encode_images(comps.vae, torch.zeros(1, 3, 32, 32)).shape,
                    generator=torch.Generator().manual_seed(0))
    cond = {"prompt_embeds": torch.randn(1, 8, 32), "pooled_prompt_embeds": torch.randn(1, 32)}
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        base = adapter.forward(model, x, sigma, cond)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(adapter.default_lora_targets)))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(1))
        trained = adapter.forward(model, x, sigma, cond)
        with lora_disabled(EngineWrapper(model)):
            off = adapter.forward(model, x, sigma, cond)
        again = adapter.forward(model, x, sigma, cond)
    assert (trained - base).abs().max() > 1e-3
    torch.testing.assert_close(off, base)
    torch.testing.assert_close(again, trained)


def test_a_handoff_of_another_shape_or_unreadable_is_not_used(tmp_path):
    """An output dir reused at another resolution, or a damaged file: the Fast phase's validation falls back (to the
    base model's Slow steps) instead of failing after the whole run."""
    import os

    from safetensors.torch import save_file

    from fewstep.validation import HANDOFF, _read_handoff

    cfg = SimpleNamespace(output_dir=str(tmp_path))
    os.makedirs(tmp_path / "validation")
    path = str(tmp_path / "validation" / HANDOFF)
    assert _read_handoff(cfg, (1, 4, 8, 8)) is None  # none yet
    x = torch.randn(1, 4, 8, 8) + 0.5
    save_file({"latents": x}, path)
    torch.testing.assert_close(_read_handoff(cfg, (1, 4, 8, 8)), x)
    assert _read_handoff(cfg, (1, 4, 16, 16)) is None
    # a prompt edited between the phases (a user_prompt_library entry under the same nickname): not its hand-off
    from fewstep.validation import _handoff_path, _write_handoff
    _write_handoff(cfg, x, "cat", "a cat")
    assert _handoff_path(cfg, "cat").endswith("glance-slow-handoff-cat.safetensors")
    torch.testing.assert_close(_read_handoff(cfg, (1, 4, 8, 8), "cat", "a cat"), x)
    assert _read_handoff(cfg, (1, 4, 8, 8), "cat", "a dog") is None
    assert _read_handoff(cfg, (1, 4, 8, 8), "dog", "a cat") is None
    with open(path, "wb") as fh:
        fh.write(b"not safetensors")
    assert _read_handoff(cfg, (1, 4, 8, 8)) is None
