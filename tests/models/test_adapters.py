"""Family adapters on tiny pipelines: load -> encode -> forward, stock-pipeline parity, collation, LoRA export."""
import time

import pytest
import torch
from conftest import FAMILY_NAMES

from fewstep.models import FAMILIES, get_adapter
from fewstep_testing import HostToDeviceCopies

PROMPTS = ["a red cat sitting on a wooden table", "two blue dogs"]


def _pixels(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def _latents(adapter, comps, seed=1):
    return adapter.encode_images(comps.vae, _pixels(seed=seed))


def test_registry_lists_families_and_suggests():
    assert set(FAMILIES) == {"flux", "sd3", "qwenimage", "sdxl"}
    assert get_adapter("Qwen-Image").family == "qwenimage" and get_adapter("qwen").family == "qwenimage"
    with pytest.raises(ValueError, match=r"unknown model family 'flx'.*did you mean 'flux'.*flux, qwenimage, sd3, sdxl"):
        get_adapter("flx")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_encode_forward_loss_backprop(tiny, family):
    adapter, comps = tiny(family)
    cond = adapter.encode_prompts(comps, PROMPTS)
    assert set(cond) == set(adapter.cond_keys)
    assert all(v.shape[0] == 2 for v in cond.values())
    # different captions -> different embeddings
    assert not torch.allclose(cond["prompt_embeds"][0], cond["prompt_embeds"][1])

    x = _latents(adapter, comps)
    mult = adapter.vae_scale_factor(comps.vae) * adapter.patch_factor(comps.denoiser)
    assert 32 % mult == 0 and x.shape[-1] == 32 // adapter.vae_scale_factor(comps.vae)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.25, 0.8])
    s = sigma.view(-1, 1, 1, 1)
    xt = (1 - s) * x + s * noise
    comps.denoiser.zero_grad(set_to_none=True)
    v = adapter.forward(comps.denoiser, xt, sigma, cond)
    assert v.shape == x.shape
    loss = torch.nn.functional.mse_loss(v, noise - x)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in comps.denoiser.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    comps.denoiser.zero_grad(set_to_none=True)
    # sigma and the latents both matter
    with torch.no_grad():
        v2 = adapter.forward(comps.denoiser, xt, sigma.flip(0), cond)
    assert not torch.allclose(v.detach(), v2)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_encode_decode_round_trip(tiny, family):
    adapter, comps = tiny(family)
    px = _pixels()
    lat = adapter.encode_images(comps.vae, px)
    assert lat.ndim == 4 and lat.shape[0] == 2
    out = adapter.decode_latents(comps.vae, lat)
    assert out.shape == px.shape and out.min() >= -1 and out.max() <= 1
    # normalisation is exactly undone by decode: same as decoding the raw posterior mean
    with torch.no_grad():
        raw = comps.vae.encode(adapter._to_vae(px)).latent_dist.mode()
        ref = comps.vae.decode(raw, return_dict=False)[0]
    torch.testing.assert_close(out, adapter._from_vae(ref).clamp(-1, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        adapter.encode_images(comps.vae, px[:, :1])


# flow families: their stock pipelines take custom sigmas with their own Euler scheduler. SDXL's pipeline samples the
# bridged UNet with fewstep's TwinFlowScheduler: tests/schedulers/test_twinflow_scheduler_diffusion.py.
@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if f != "sdxl"])
def test_stock_pipeline_matches_euler_loop(tiny, family):
    """pipe(prompt kwargs, custom sigmas, output_type='latent') == hand-written Euler steps over adapter.forward."""
    adapter, comps = tiny(family)
    cond = adapter.encode_prompts(comps, PROMPTS)
    x0 = torch.randn(_latents(adapter, comps).shape, generator=torch.Generator().manual_seed(3))
    h, w = x0.shape[-2:]
    sigmas = [1.0, 0.7, 0.3]
    pipe = adapter.build_pipeline(comps)
    common = dict(**adapter.pipeline_prompt_kwargs(cond), **adapter.pipeline_latent_kwargs(comps, x0),
                  sigmas=sigmas, num_inference_steps=len(sigmas), return_dict=False)
    with torch.no_grad():
        got = adapter.latents_from_pipeline(pipe(**common, output_type="latent")[0], h, w)
        x = x0
        for s, s_next in zip(sigmas, sigmas[1:] + [0.0]):  # diffusers appends the terminal sigma 0
            x = x + (s_next - s) * adapter.forward(comps.denoiser, x, torch.full((2,), s), cond)
        images = pipe(**common, output_type="pt")[0]
    assert got.shape == x0.shape
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    # the pipeline's own decode agrees with decode_latents (pt images are in [0,1])
    torch.testing.assert_close(images, (adapter.decode_latents(comps.vae, x) + 1) / 2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if f != "sdxl"])
def test_a_bf16_transformer_call_is_the_stock_pipelines(tiny_dirs, family):
    """In bf16, training's transformer call at a sigma is the one the stock pipeline makes there, bit for bit, the
    timestep's rounding included: FLUX's and Qwen-Image's pipelines round t = 1000 sigma to bf16 and divide by 1000
    there (training once rounded sigma itself: at 0.998 the pipeline's 1.0, training's 0.996), SD3's passes the
    scheduler's fp32 t (training once rounded it to bf16: 0.999 became 1000, not 999)."""
    adapter = get_adapter(family)
    comps = adapter.load(str(tiny_dirs(family)), dtype=torch.bfloat16)
    cond = adapter.encode_prompts(comps, PROMPTS[:1])
    x0 = adapter.start_noise(comps, 1, 32, 32, torch.Generator().manual_seed(3)).to(torch.bfloat16)
    h, w = x0.shape[-2:]
    seen = []
    hook = comps.denoiser.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    with torch.no_grad():
        for sigma in (0.999, 0.998, 0.77, 0.3337):
            adapter.build_pipeline(comps)(**adapter.pipeline_prompt_kwargs(cond),
                                          **adapter.pipeline_latent_kwargs(comps, x0), sigmas=[sigma],
                                          num_inference_steps=1, output_type="latent")
            ours = adapter.forward(comps.denoiser, x0, torch.tensor([sigma]), cond)
            assert torch.equal(adapter.unpack(seen[-2], h, w), ours), sigma
    hook.remove()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_start_noise_is_what_the_stock_pipeline_draws(tiny, family):
    """`start_noise` + `pipeline_latent_kwargs` give the stock pipeline the very start latents it draws itself in
    fp32 from the same generator (shape and stream), so fixing the noise's dtype changes no fp32 image."""
    adapter, comps = tiny(family)
    cond = adapter.encode_prompts(comps, PROMPTS[:1])
    pipe = adapter.build_pipeline(comps)
    common = dict(**adapter.pipeline_prompt_kwargs(cond), num_inference_steps=2, output_type="latent",
                  return_dict=False)
    with torch.no_grad():
        own = pipe(**common, height=32, width=48, generator=torch.Generator().manual_seed(4))[0]
        noise = adapter.start_noise(comps, 1, 32, 48, torch.Generator().manual_seed(4))
        given = pipe(**common, **adapter.pipeline_latent_kwargs(comps, noise))[0]
    assert noise.dtype == torch.float32 and noise.shape[-2:] == (32 // adapter.vae_scale_factor(comps.vae),
                                                                 48 // adapter.vae_scale_factor(comps.vae))
    assert torch.equal(own, given)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_collate_split_round_trip(tiny, family):
    adapter, comps = tiny(family)
    prompts = ["a cat", "a small red house next to a tall green tree by the river", "two dogs"]
    batch = adapter.encode_prompts(comps, prompts)
    items = adapter.split_cond(batch)
    assert len(items) == 3 and all(v.shape[0] != 3 or k == "pooled_prompt_embeds" for k, v in items[0].items())
    again = adapter.collate_cond(items)
    assert set(again) == set(batch)
    for k in batch:
        assert torch.equal(again[k], batch[k]), k
    # per-prompt encodings (each its own length for Qwen) collate to the batch encoding
    single = [adapter.split_cond(adapter.encode_prompts(comps, [p]))[0] for p in prompts]
    collated = adapter.collate_cond(single)
    for k in batch:
        torch.testing.assert_close(collated[k], batch[k], rtol=1e-5, atol=1e-5)


def test_collate_pads_variable_length_text(tiny):
    adapter, comps = tiny("qwenimage")
    a = adapter.split_cond(adapter.encode_prompts(comps, ["a cat"]))[0]
    b = adapter.split_cond(adapter.encode_prompts(comps, ["a big black cat sitting on a red sofa in the sun"]))[0]
    assert a["prompt_embeds"].shape[0] < b["prompt_embeds"].shape[0]
    out = adapter.collate_cond([a, b])
    n = a["prompt_embeds"].shape[0]
    assert out["prompt_embeds"].shape[:2] == out["prompt_embeds_mask"].shape == (2, b["prompt_embeds"].shape[0])
    assert out["prompt_embeds_mask"][0, :n].all() and not out["prompt_embeds_mask"][0, n:].any()
    assert out["prompt_embeds_mask"][1].all()
    # the padded sample's prediction is unchanged by the padding
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    sig = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        both = adapter.forward(comps.denoiser, x, sig, out)
        alone = adapter.forward(comps.denoiser, x[:1], sig[:1], adapter.collate_cond([a]))
    torch.testing.assert_close(both[:1], alone, rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError, match="keys"):
        adapter.collate_cond([a, {"prompt_embeds": a["prompt_embeds"]}])


def test_an_all_valid_text_mask_is_left_out_so_attention_runs_unmasked(tiny, monkeypatch):
    """Captions of one length (a batch of one, the empty prompt of CFG): collate_cond leaves the mask out, as
    QwenImagePipeline does, so attention gets no mask (one rules out the flash kernels), and the prediction is the
    one with the all-ones mask. A padded batch keeps its mask, and its attention is masked."""
    adapter, comps = tiny("qwenimage")
    a = adapter.split_cond(adapter.encode_prompts(comps, ["a cat"]))[0]
    b = adapter.split_cond(adapter.encode_prompts(comps, ["a big black cat sitting on a red sofa in the sun"]))[0]
    same, padded = adapter.collate_cond([a, a]), adapter.collate_cond([a, b])
    assert "prompt_embeds_mask" not in same and not padded["prompt_embeds_mask"].all()
    masks, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    sig = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        unmasked = adapter.forward(comps.denoiser, x, sig, same)
        assert masks and all(m is None for m in masks), "attention got a mask"
        masks.clear()
        ones = {**same, "prompt_embeds_mask": torch.ones(same["prompt_embeds"].shape[:2], dtype=torch.long)}
        torch.testing.assert_close(unmasked, adapter.forward(comps.denoiser, x, sig, ones), rtol=1e-5, atol=1e-6)
        masks.clear()
        adapter.forward(comps.denoiser, x, sig, padded)
        assert masks and all(m is not None for m in masks)


def test_forward_input_errors(tiny):
    adapter, comps = tiny("flux")
    cond = adapter.encode_prompts(comps, PROMPTS)
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="sigma must have shape"):
        adapter.forward(comps.denoiser, x, torch.tensor([0.5]), cond)
    with pytest.raises(KeyError, match="pooled_prompt_embeds"):
        adapter.forward(comps.denoiser, x, torch.tensor([0.5, 0.5]), {"prompt_embeds": cond["prompt_embeds"]})
    with pytest.raises(ValueError, match="even"):
        adapter.forward(comps.denoiser, torch.randn(2, 4, 7, 8), torch.tensor([0.5, 0.5]), cond)
    with pytest.raises(ValueError, match="any-step"):
        adapter.forward(comps.denoiser, x, torch.tensor([0.5, 0.5]), cond, sign=-1.0)


def test_flux_guidance_kwarg_reaches_the_model(tiny):
    adapter, comps = tiny("flux")
    assert comps.denoiser.config.guidance_embeds
    cond = adapter.encode_prompts(comps, PROMPTS)
    x, sig = torch.randn(2, 4, 16, 16), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        default = adapter.forward(comps.denoiser, x, sig, cond)
        one = adapter.forward(comps.denoiser, x, sig, cond, guidance=1.0)
        other = adapter.forward(comps.denoiser, x, sig, cond, guidance=4.0)
    assert torch.equal(default, one) and not torch.allclose(one, other)
    assert adapter.pipeline_prompt_kwargs(cond, guidance=4.0)["guidance_scale"] == 4.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flux_position_ids_are_the_pipelines_made_once_per_shape(dtype):
    """FLUX's position ids, made on the device once per shape, equal FluxPipeline's (made on the CPU and copied over
    in every call), also past bf16's exact integers (256)."""
    from diffusers import FluxPipeline

    from fewstep.models.flux import position_ids

    for h, w in ((3, 5), (300, 7)):
        img, txt = position_ids(h, w, 11, torch.device("cpu"), dtype)
        assert torch.equal(img, FluxPipeline._prepare_latent_image_ids(1, h, w, torch.device("cpu"), dtype))
        assert torch.equal(txt, torch.zeros(11, 3, dtype=dtype)) and img.dtype == txt.dtype == dtype
        assert position_ids(h, w, 11, torch.device("cpu"), dtype)[0] is img


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_targets_exist_and_export_round_trips(tiny_dirs, family, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    adapter = get_adapter(family)
    comps = adapter.load(tiny_dirs(family), with_text=False)
    names = [n for n, _ in comps.denoiser.named_modules()]
    for target in adapter.default_lora_targets:
        assert any(n == target or n.endswith("." + target) for n in names), f"{family}: no module {target!r}"
    comps.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(adapter.default_lora_targets),
                                             init_lora_weights="gaussian"))
    with torch.no_grad():  # make the LoRA non-trivial (B is zero-initialised)
        for n, p in comps.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    sd = get_peft_model_state_dict(comps.denoiser)
    adapter.save_lora(tmp_path, sd)

    base = adapter.load(tiny_dirs(family), with_text=False)
    pipe = adapter.build_pipeline(base)
    pipe.load_lora_weights(str(tmp_path))
    cond = adapter.collate_cond([_fake_cond(adapter, comps.denoiser)] * 2)
    x, sig = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        want = adapter.forward(comps.denoiser, x, sig, cond)
        denoiser = getattr(pipe, adapter.denoiser_subfolder)
        got = adapter.forward(denoiser, x, sig, cond)
        pipe.unload_lora_weights()
        plain = adapter.forward(denoiser, x, sig, cond)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(plain, want)


def _fake_cond(adapter, transformer):
    """Per-sample conditioning with the right widths, without text encoders."""
    g = torch.Generator().manual_seed(6)
    cfg = transformer.config
    if adapter.family == "sdxl":  # UNet: cross-attention width; pooled = add_embedding input minus the 6 time ids
        text, pooled = cfg.cross_attention_dim, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    else:
        text, pooled = cfg.joint_attention_dim, cfg.get("pooled_projection_dim")
    out = {"prompt_embeds": torch.randn(5, text, generator=g)}
    if "pooled_prompt_embeds" in adapter.cond_keys:
        out["pooled_prompt_embeds"] = torch.randn(pooled, generator=g)
    if "prompt_embeds_mask" in adapter.cond_keys:
        out["prompt_embeds_mask"] = torch.ones(5, dtype=torch.long)
    return out


def test_tiny_name_resolves_and_is_cached(tiny_dirs, tmp_path, monkeypatch):
    import fewstep.models.tiny as tiny_mod

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    adapter = get_adapter("flux")
    comps = adapter.load("tiny:flux", with_text=False, with_vae=False)
    where = tmp_path / "tiny" / "flux-v1"
    assert comps.source == str(where) and (where / "model_index.json").exists()
    assert not [p for p in where.parent.iterdir() if p.name.startswith(".")]  # temp dir renamed, none left over
    # seeded: identical weights to an independently saved tiny pipeline
    ref = adapter.load(tiny_dirs("flux"), with_text=False, with_vae=False).denoiser.state_dict()
    for k, v in comps.denoiser.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # second resolution reuses the cache without rebuilding
    monkeypatch.setattr(tiny_mod, "save_tiny_pipeline", lambda *a, **k: pytest.fail("rebuilt a cached pipeline"))
    assert adapter.resolve("tiny:flux") == str(where)
    with pytest.raises(ValueError, match="'tiny:sd3' is a 'sd3' model, but model_family is 'flux': use "
                                         "'tiny:flux', or set model_family 'sd3'"):
        adapter.resolve("tiny:sd3")


def test_a_folder_of_another_family_is_named_before_loading(tiny_dirs):
    """A FLUX folder given with model_family sd3 fails at resolve (before the data scan and cache fill), naming the
    class it holds and the family that trains it."""
    from fewstep.errors import ModelFamilyError, ModelSourceError

    flux = str(tiny_dirs("flux"))
    with pytest.raises(ModelFamilyError, match=r"holds a FluxTransformer2DModel in transformer/, but model_family "
                                               r"'sd3' trains a SD3Transformer2DModel: set model_family 'flux'"):
        get_adapter("sd3").resolve(flux)
    with pytest.raises(ModelSourceError, match=r"has no unet/config.json: model_family 'sdxl' loads a "
                                               r"UNet2DConditionModel"):
        get_adapter("sdxl").resolve(flux)
    assert get_adapter("flux").resolve(flux) == flux


def test_hub_id_without_network_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    # a port nothing listens on: refused at once, whatever the machine's network
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    adapter = get_adapter("flux")
    import diffusers  # noqa: F401  (imported before the clock starts: the bound is on the network, not imports)
    import transformers  # noqa: F401
    t0 = time.perf_counter()
    with pytest.raises(OSError, match=r"'black-forest-labs/FLUX.1-dev'.*--local-dir"):
        adapter.load("black-forest-labs/FLUX.1-dev")
    assert time.perf_counter() - t0 < 10
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"'org/model'.*HF_HUB_OFFLINE"):
        adapter.load("org/model")


def test_missing_local_dir_fails_clearly(tmp_path):
    adapter = get_adapter("sd3")
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        adapter.load(missing)
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        adapter.load(str(tmp_path))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_forward_on_a_device_copies_nothing_from_the_host(tiny_dirs, family):
    """Model and inputs on a device (`meta` stands in for a GPU): after the first call (diffusers and the SDXL bridge
    move their tables once per device), a forward with the any-step inputs copies nothing from the CPU. A TwinFlow
    micro-step makes about ten such calls; each host copy would stall the GPU and ZeRO-3's prefetch."""
    adapter = get_adapter(family)
    comps = adapter.load(tiny_dirs(family))
    cond = adapter.encode_prompts(comps, PROMPTS)
    x = _latents(adapter, comps)
    model = comps.denoiser
    adapter.add_anystep(model)
    meta = torch.device("meta")
    model.to(meta)
    x, cond = x.to(meta), {k: v.to(meta) for k, v in cond.items()}
    sigma, tt, sign = (torch.tensor(v).to(meta) for v in ([0.25, 0.8], [0.1, 0.5], [1.0, -1.0]))
    for call in range(2):
        mode = HostToDeviceCopies()
        with mode:
            v = adapter.forward(model, x, sigma, cond, tt=tt, sign=sign)
        assert v.shape == x.shape and v.device == meta
    assert mode.copies == [], f"{family}: host-to-device copies (where, shape, blocking) {mode.copies} in every forward"
