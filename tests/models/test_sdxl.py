"""The SDXL adapter: a UNet diffusion base behind the flow-model interface, through the diff2flow bridge."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from fewstep.methods.diff2flow import diff2flow_model, sigma_table
from fewstep.models import anystep, get_adapter


def _cond(unet, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return {"prompt_embeds": torch.randn(b, 5, c.cross_attention_dim, generator=g),
            "pooled_prompt_embeds": torch.randn(b, pooled, generator=g)}


def v_folder(tiny_dirs, tmp_path):
    """The tiny SDXL pipeline with its scheduler config switched to v prediction (same weights)."""
    dst = tmp_path / "sdxl-v"
    shutil.copytree(tiny_dirs("sdxl"), dst)
    path = dst / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    return dst


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_forward_is_the_diff2flow_bridge_over_the_unet(tiny_dirs, tmp_path, kind):
    adapter = get_adapter("sdxl")
    comps = adapter.load(str(v_folder(tiny_dirs, tmp_path)) if kind == "v_prediction" else tiny_dirs("sdxl"),
                         with_text=False)
    assert adapter.prediction_type == kind  # read from the folder's scheduler config
    unet = comps.denoiser
    torch.testing.assert_close(adapter.alphas_cumprod.float(), comps.scheduler.alphas_cumprod)  # its own betas
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([1.0, 0.95, 0.5, 0.01])  # above, inside and below the base's range
    cond = _cond(unet, 4)
    h = w = 8 * adapter.pixel_factor
    ids = torch.tensor([[h, w, 0, 0, h, w]] * 4, dtype=torch.float32)

    def unet_call(x_k, timestep, c):  # the UNet as a diffusion user calls it
        return unet(x_k, timestep, encoder_hidden_states=c["prompt_embeds"],
                    added_cond_kwargs={"text_embeds": c["pooled_prompt_embeds"], "time_ids": ids}).sample

    with torch.no_grad():
        got = adapter.forward(unet, x, sigma, cond)
        want = diff2flow_model(unet_call, comps.scheduler.alphas_cumprod, kind)(x, sigma, sigma, cond)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    lo, hi = adapter.sigma_range()
    assert lo == pytest.approx(float(sigma_table(comps.scheduler.alphas_cumprod)[0])) and 0.9 < hi < 0.95
    adapter.set_prediction_type("epsilon" if kind == "v_prediction" else "v_prediction")  # the config's choice wins
    with torch.no_grad():
        assert not torch.allclose(adapter.forward(unet, x, sigma, cond), got)
    with pytest.raises(ValueError, match="'epsilon' or 'v_prediction'"):
        adapter.set_prediction_type("flow_matching")


def test_the_configs_prediction_type_survives_loading_the_folder(tiny_dirs):
    """The trainer's order: resolve, use the config's type (a v fine-tune with an epsilon scheduler config), then load
    the VAE from the same folder (which resolves it again): the config's type must still be the one used."""
    adapter = get_adapter("sdxl")
    src = adapter.resolve(str(tiny_dirs("sdxl")))
    assert adapter.folder_prediction_type == "epsilon"
    assert "using 'v_prediction'" in adapter.use_prediction_type("v_prediction", src)
    adapter.load(src, with_denoiser=False, with_text=False)
    assert adapter.prediction_type == "v_prediction"


def test_anystep_on_the_unet_time_embedding(tiny_dirs):
    adapter = get_adapter("sdxl")
    unet = adapter.load(tiny_dirs("sdxl"), with_text=False, with_vae=False).denoiser
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma, cond = torch.tensor([0.7, 0.3]), _cond(unet)
    with torch.no_grad():
        base = adapter.forward(unet, x, sigma, cond)
        embed = adapter.add_anystep(unet)
        assert embed.sign_embed.weight.shape[1] == unet.time_embedding.linear_2.out_features
        # zero-initialised: bit-identical to the base model until trained
        assert torch.equal(adapter.forward(unet, x, sigma, cond, tt=torch.tensor([0.2, 0.0]), sign=-1.0), base)
        for p in embed.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        pos = adapter.forward(unet, x, sigma, cond, tt=sigma, sign=1.0)
        neg = adapter.forward(unet, x, sigma, cond, tt=sigma, sign=-1.0)
        far = adapter.forward(unet, x, sigma, cond, tt=torch.zeros(2), sign=1.0)
    assert not torch.allclose(pos, neg) and not torch.allclose(pos, far)
    # the UNet's time embedding sees a sinusoid, not the timestep: t must come from the caller or a scheduler
    with pytest.raises(ValueError, match="pass t"), anystep.anystep_state(unet, tt=0.0):
        unet(x, torch.tensor([500.0, 500.0]), encoder_hidden_states=cond["prompt_embeds"],
             added_cond_kwargs={"text_embeds": cond["pooled_prompt_embeds"], "time_ids": torch.zeros(2, 6)})


def test_empty_prompt_is_zeros_as_sdxl_pipelines_use_it(tiny):
    adapter, comps = tiny("sdxl")
    cond = adapter.encode_prompts(comps, ["a red cube", ""])
    assert cond["prompt_embeds"][0].abs().sum() > 0 and cond["pooled_prompt_embeds"][0].abs().sum() > 0
    assert not cond["prompt_embeds"][1].any() and not cond["pooled_prompt_embeds"][1].any()
    # the pipeline's own text for a real prompt: penultimate CLIP states of both encoders, bigG's projected pool
    pipe = adapter.build_pipeline(comps)
    embeds, _, pooled, _ = pipe.encode_prompt("a red cube", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["prompt_embeds"][:1], embeds)
    torch.testing.assert_close(cond["pooled_prompt_embeds"][:1], pooled)


def _folder_with(tiny_dirs, tmp_path, file, **changes):
    """A copy of the tiny SDXL folder with `changes` merged into one of its JSON files."""
    dst = tmp_path / "sdxl-changed"
    shutil.copytree(tiny_dirs("sdxl"), dst)
    path = dst / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return str(dst)


def test_a_folder_that_keeps_the_empty_prompts_clip_embedding_is_followed(tiny_dirs, tmp_path):
    """model_index.json's force_zeros_for_empty_prompt: false (some SDXL-layout fine-tunes) means "" is encoded as
    CLIP's embedding of "", for caption dropout, the CFG target and validation alike, as the folder's own pipeline."""
    from diffusers import StableDiffusionXLPipeline

    src = _folder_with(tiny_dirs, tmp_path, "model_index.json", force_zeros_for_empty_prompt=False)
    adapter = get_adapter("sdxl")
    comps = adapter.load(src, with_denoiser=False, with_vae=False)
    cond = adapter.encode_prompts(comps, [""])
    assert cond["prompt_embeds"].abs().sum() > 0 and cond["pooled_prompt_embeds"].abs().sum() > 0
    assert not StableDiffusionXLPipeline.from_pretrained(src).config.force_zeros_for_empty_prompt


def test_epsilon_on_a_zero_terminal_snr_schedule_is_refused(tiny_dirs, tmp_path):
    """x0 = (x - b eps) / a with a = sqrt(alphas_cumprod) ~ 0 at the last step of a zero-terminal-SNR schedule:
    the bridge would multiply eps by thousands near sigma = 1. Such bases predict v, which works."""
    from fewstep.errors import ConfigError

    src = _folder_with(tiny_dirs, tmp_path, "scheduler/scheduler_config.json", rescale_betas_zero_snr=True)
    adapter = get_adapter("sdxl")
    src = adapter.resolve(src)
    with pytest.raises(ConfigError, match="zero-terminal-SNR.*v_prediction"):
        adapter.use_prediction_type("epsilon", src)
    assert "using 'v_prediction'" in adapter.use_prediction_type("v_prediction", src)


def _images(root, sizes):
    """Random RGB images of the given (w, h) sizes with one caption each; returns the multidatabackend.json path."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(os.path.join(img_dir, f"im{i}.png"))
        with open(os.path.join(img_dir, f"im{i}.txt"), "w") as fh:
            fh.write(f"caption {i}")
    path = os.path.join(root, "multidatabackend.json")
    with open(path, "w") as fh:
        json.dump([{"id": "d", "backend": "simple", "image_dir": img_dir, "resolution": 32, "crop": True,
                    "crop_style": "random", "caption_extension": ".txt"}], fh)
    return path, img_dir


def test_training_batches_carry_each_images_size_and_crop(tiny_dirs, tmp_path):
    """SDXL's add_time_ids in a training batch are each image's own (as diffusers' SDXL fine-tuning builds them):
    original (h, w), the crop's top-left (y, x) in the resized image (checked against the cached pixels), target
    (h, w); the unconditional batch (TwinFlow's CFG target) carries the same; the UNet is called with them, and with
    the pipeline's uncropped default (H, W, 0, 0, H, W) without them."""
    from types import SimpleNamespace

    from PIL import Image

    from fewstep.data.backends import load_data_config
    from fewstep.data.buckets import load_planned
    from fewstep.data.cache import CachedDataset, CacheSet
    from fewstep.data.dataset import collect_samples
    from fewstep.data.order import DataOrder
    from fewstep.step_context import StepContext, next_batch
    from fewstep_testing import sample_table

    sizes = {"im0.png": (48, 40), "im1.png": (40, 64), "im2.png": (56, 44)}  # (w, h), none square
    backend, img_dir = _images(str(tmp_path), list(sizes.values()))
    config = load_data_config(backend)
    samples, _ = collect_samples(config, 8)
    caches = CacheSet(sample_table(tmp_path, samples), config.images, [""], str(tmp_path / "cache"), "m")
    for root in caches.roots():
        caches.cache_at(root).fill(*caches.share(root, 0, 1), lambda px: px[:, :1].clone(),
                                   lambda ps: [{"prompt_embeds": torch.randn(3, 4) + 1.0,
                                                "pooled_prompt_embeds": torch.randn(4) + 1.0} for _ in ps])
    ds = CachedDataset(caches, config.images, 8)
    adapter = get_adapter("sdxl")
    ctx = StepContext(cfg=SimpleNamespace(caption_dropout_probability=0.0), adapter=adapter, engine=None, dataset=ds,
                      order=DataOrder(len(ds), 3, 0, 1, seed=5), device=torch.device("cpu"), dtype=torch.float32)
    picks = DataOrder(len(ds), 3, 0, 1, seed=5).next_items(ds.layout)  # the same draw, to know which rows are whose
    x0, cond, uncond = next_batch(ctx, with_uncond=True)
    assert cond["time_ids"].shape == (3, 6) and torch.equal(uncond["time_ids"], cond["time_ids"])
    crops = set()
    for row, (i, _) in zip(cond["time_ids"].tolist(), picks):
        s = ds.samples[i]
        w, h = sizes[os.path.basename(s.image_path)]
        orig_h, orig_w, top, left, th, tw = map(int, row)
        assert (orig_h, orig_w, th, tw) == (h, w, 32, 32)
        with Image.open(s.image_path) as im:  # the training pixels are the crop at (top, left) of the resized image
            im = im.convert("RGB").resize(s.plan.resize, Image.Resampling.BICUBIC) if im.size != s.plan.resize \
                else im.convert("RGB")
            crop = torch.from_numpy(np.asarray(im.crop((left, top, left + tw, top + th)), dtype=np.float32) / 127.5
                                    - 1).permute(2, 0, 1)
        torch.testing.assert_close(load_planned(s.image_path, s.plan), crop)
        crops.add((top, left))
    assert crops != {(0, 0)}  # random crops: the corners are not the pipeline's default

    unet = adapter.load(tiny_dirs("sdxl"), with_text=False, with_vae=False).denoiser
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    sigma, text = torch.tensor([0.7, 0.4, 0.2]), _cond(unet, b=3)
    default = torch.tensor([[4 * adapter.pixel_factor] * 2 + [0, 0] + [4 * adapter.pixel_factor] * 2] * 3)
    with torch.no_grad():
        plain = adapter.forward(unet, x, sigma, text)
        assert torch.equal(adapter.forward(unet, x, sigma, {**text, "time_ids": default}), plain)
        assert not torch.allclose(adapter.forward(unet, x, sigma, {**text, "time_ids": cond["time_ids"]}), plain)
        with pytest.raises(ValueError, match=r"\[B, 6\]"):
            adapter.forward(unet, x, sigma, {**text, "time_ids": cond["time_ids"][:2]})
    assert get_adapter("flux").micro_cond([s.plan for s in ds.samples]) == {}  # other families: none
