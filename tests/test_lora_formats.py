"""The ComfyUI/kohya LoRA file (`lora_export_formats: [diffusers, comfyui]`) round-trips through diffusers' own
converters for non-diffusers layouts: `load_lora_weights` on it gives the transformer exactly the LoRA of the
diffusers file, which itself reproduces the trained model (alpha folded into lora_B)."""
import os

import pytest
import torch
from safetensors.torch import load_file

from fewstep import lora_formats
from fewstep.config import ConfigError, load_config
from fewstep.lora import export_lora
from fewstep.models import get_adapter
from fewstep.models.base import ModelComponents

# Flux: every double-block module diffusers' kohya converter maps (to_v left out: its zero block is exercised),
# plus the single-block modules outside linear1 (diffusers hard-codes FLUX.1's widths for linear1: tested below
# at full width without a model)
FLUX_TINY_TARGETS = [f"transformer_blocks.0.{m}" for m in (
    "attn.to_q", "attn.to_k", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
    "norm1_context.linear")] + ["single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.norm.linear"]
QWEN_TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                "img_mlp.net.0.proj", "img_mlp.net.2", "img_mod.1", "txt_mlp.net.0.proj", "txt_mlp.net.2", "txt_mod.1",
                "img_in", "txt_in", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
                "time_text_embed.timestep_embedder.linear_2"]  # proj_out: see test_qwen_top_level_proj_out
SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]  # kohya's


def _bare(family):
    adapter = get_adapter(family)
    return adapter, adapter.load(f"tiny:{adapter.family}", with_text=False, with_vae=False).denoiser.eval()


def _trained(family, targets, rank=4, alpha=16.0):
    """A tiny transformer with a LoRA of random, non-zero A and B (scale alpha / rank = 4)."""
    from peft import LoraConfig

    adapter, t = _bare(family)
    t.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return adapter, t


def _loaded(family, directory, weight_name):
    """A fresh tiny transformer after the stock pipeline's `load_lora_weights(directory, weight_name=...)`."""
    adapter, t = _bare(family)
    no_text = adapter._text_kwargs(ModelComponents(None, None))  # every text encoder/tokenizer None
    pipe = adapter.pipeline_cls(**{adapter.denoiser_subfolder: t}, vae=None, scheduler=None, **no_text)
    pipe.load_lora_weights(directory, weight_name=weight_name)
    return t


def _deltas(t):
    from peft.tuners.lora import LoraLayer

    return {n: m.get_delta_weight(m.active_adapters[0]) for n, m in t.named_modules() if isinstance(m, LoraLayer)}


def _inputs(adapter, family):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 4, 4, generator=g)
    cond = {"prompt_embeds": torch.randn(1, 6, 64 if family == "sdxl" else 32, generator=g)}
    cond.update({"pooled_prompt_embeds": torch.randn(1, 32, generator=g)} if family in ("flux", "sdxl") else
                {"prompt_embeds_mask": torch.ones(1, 6, dtype=torch.long)})
    return x, torch.tensor([0.7]), cond


@pytest.mark.parametrize("family,targets", [("flux", FLUX_TINY_TARGETS), ("qwen_image", QWEN_TARGETS),
                                            ("sdxl", SDXL_TARGETS)])
def test_comfyui_file_round_trips_through_diffusers(tmp_path, family, targets):
    adapter, trained = _trained(family, targets)
    export_lora(adapter, trained, str(tmp_path), True, ["diffusers", "comfyui"])
    comfy = load_file(str(tmp_path / lora_formats.COMFYUI_WEIGHTS_NAME))
    assert comfy and all(k.startswith("lora_unet_") for k in comfy)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in comfy)
    if family == "flux":  # BFL names, fused q/k/v
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in comfy
        assert "lora_unet_single_blocks_0_linear2.lora_up.weight" in comfy
        assert not any("to_q" in k for k in comfy)
    if family == "sdxl":  # sgm names; the tiny UNet has layers_per_block 1: down_blocks.1.attentions.0 = input 3
        assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in comfy
        assert "lora_unet_middle_block_1_proj_in.lora_up.weight" in comfy
        assert "lora_unet_output_blocks_1_1_transformer_blocks_0_ff_net_2.alpha" in comfy
        assert not any("down_blocks" in k or "attentions" in k for k in comfy)
    a = _loaded(family, str(tmp_path), "pytorch_lora_weights.safetensors")
    b = _loaded(family, str(tmp_path), lora_formats.COMFYUI_WEIGHTS_NAME)
    da, db = _deltas(a), _deltas(b)
    assert set(da) <= set(db)
    assert all(torch.equal(da[n], db[n]) for n in da)  # the same effective weights, bit for bit
    assert all(not db[n].any() for n in set(db) - set(da))  # fused members without a LoRA: all-zero LoRAs
    x, sigma, cond = _inputs(adapter, family)
    with torch.no_grad():
        ya, yb, yt = (adapter.forward(m, x, sigma, cond) for m in (a, b, trained))
        base = adapter.forward(_bare(family)[1], x, sigma, cond)
    assert torch.equal(ya, yb)
    assert torch.equal(ya, yt)  # the diffusers file reproduces the trained model: its scale (4) is in lora_B
    assert (ya - base).abs().max() > 1e-3


def test_flux_fused_single_blocks_at_full_width(tmp_path):
    """Single-block linear1 (to_q|to_k|to_v|proj_mlp) and the top-level modules, at FLUX.1's widths (diffusers'
    converter hard-codes them), through `FluxPipeline.lora_state_dict`, the loader's converter step. No model."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    with torch.device("meta"):
        flux = FluxTransformer2DModel(num_layers=19, num_single_layers=38, guidance_embeds=True)
    linears = {n: m for n, m in flux.named_modules() if isinstance(m, torch.nn.Linear)}
    blocks = ("transformer_blocks.0.", "transformer_blocks.18.", "single_transformer_blocks.0.",
              "single_transformer_blocks.37.")
    modules = [n for n in linears if n.startswith(blocks)]
    modules = [n for n in modules if not n.startswith("single_transformer_blocks.0.proj_mlp")]  # a zero block
    top = [n for n in linears if not n.startswith(("transformer_blocks", "single_transformer_blocks"))]
    g = torch.Generator().manual_seed(0)
    sd = {}
    for n in modules + top:
        sd[f"transformer.{n}.lora_A.weight"] = torch.randn(2, linears[n].in_features, generator=g)
        sd[f"transformer.{n}.lora_B.weight"] = torch.randn(linears[n].out_features, 2, generator=g)
    lora_formats.save_kohya("flux", sd, str(tmp_path / "comfy.safetensors"),
                            {n: m.out_features for n, m in linears.items()})
    back = FluxPipeline.lora_state_dict(str(tmp_path), weight_name="comfy.safetensors")
    for n in modules:
        for k in (f"transformer.{n}.lora_A.weight", f"transformer.{n}.lora_B.weight"):
            assert torch.equal(back[k], sd[k]), k
    zero = "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"
    assert zero in back and not back[zero].any()
    # top-level modules come back with their exact tensors (norm_out.linear's halves swapped back), but diffusers
    # 0.42.1 names them without the `transformer.` prefix, so its load_lora_weights skips them (README)
    for n in top:
        for k in (f"{n}.lora_A.weight", f"{n}.lora_B.weight"):
            got = back.get("transformer." + k, back.get(k))
            assert got is not None and torch.equal(got, sd["transformer." + k]), k


def test_sdxl_at_full_layout(tmp_path):
    """At SDXL base 1.0's layout (layers_per_block 2, transformer depths 1/2/10; a meta UNet, no weights): every
    attention Linear gets the sgm name public SDXL LoRAs carry (kohya's sd-scripts reports 722 U-Net modules for
    them), and diffusers' sgm converter (`StableDiffusionXLPipeline.lora_state_dict` with the UNet config, as
    `load_lora_weights` calls it) returns every tensor exactly."""
    import json

    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft

    from fewstep_testing import REPO

    with open(os.path.join(REPO, "configs", "models", "sdxl.json")) as fh:
        config = {k: v for k, v in json.load(fh).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    linears = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and "attentions" in n}
    g = torch.Generator().manual_seed(0)
    sd = {}
    for n, m in linears.items():
        sd[f"unet.{n}.lora_A.weight"] = torch.randn(1, m.in_features, generator=g)
        sd[f"unet.{n}.lora_B.weight"] = torch.randn(m.out_features, 1, generator=g)
    lora_formats.save_kohya("sdxl", sd, str(tmp_path / "comfy.safetensors"),
                            layers_per_block=config["layers_per_block"])
    names = {k.rsplit(".", 2)[0] for k in load_file(str(tmp_path / "comfy.safetensors"))}
    assert len(names) == len(linears) == 722
    for anchor in ("input_blocks_4_1_proj_in", "input_blocks_8_1_transformer_blocks_9_attn2_to_v",
                   "middle_block_1_transformer_blocks_9_attn1_to_out_0", "output_blocks_0_1_transformer_blocks_9_ff_net_2",
                   "output_blocks_5_1_transformer_blocks_1_ff_net_2", "output_blocks_5_1_transformer_blocks_1_attn1_to_k"):
        assert "lora_unet_" + anchor in names, anchor
    back, alphas = StableDiffusionXLPipeline.lora_state_dict(str(tmp_path), weight_name="comfy.safetensors",
                                                            unet_config=unet.config)
    # load_lora_into_unet's next step: the old diffusers names to peft's
    back = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in back.items()})
    assert {"unet." + k for k in back} == sd.keys()
    assert all(torch.equal(v, sd["unet." + k]) for k, v in back.items())
    assert len(alphas) == 722 and set(alphas.values()) == {1.0}  # alpha = rank: the file's LoRA at scale 1


def test_qwen_top_level_proj_out(tmp_path):
    """Qwen-Image's top-level proj_out (its name is also a suffix of no block module) maps to itself."""
    adapter, trained = _trained("qwen_image", ["proj_out"])
    export_lora(adapter, trained, str(tmp_path), True, ["diffusers", "comfyui"])
    assert set(load_file(str(tmp_path / lora_formats.COMFYUI_WEIGHTS_NAME))) == {
        "lora_unet_proj_out.lora_down.weight", "lora_unet_proj_out.lora_up.weight", "lora_unet_proj_out.alpha"}
    da = _deltas(_loaded("qwen_image", str(tmp_path), "pytorch_lora_weights.safetensors"))
    db = _deltas(_loaded("qwen_image", str(tmp_path), lora_formats.COMFYUI_WEIGHTS_NAME))
    assert da.keys() == db.keys() == {"proj_out"} and torch.equal(da["proj_out"], db["proj_out"])


def test_modules_without_a_kohya_key_are_refused_before_training():
    from types import SimpleNamespace

    from fewstep.config import ConfigError
    from fewstep.lora import prepare_trainable

    adapter, t = _bare("flux")
    cfg = SimpleNamespace(model_type="lora", gradient_checkpointing=False, lora_rank=4, lora_alpha=4.0,
                          lora_dropout=0.0, lora_init_type="default", lora_targets=["to_q", "tt_linear_1"],
                          lora_export_formats=["diffusers", "comfyui"])
    with pytest.raises(ConfigError, match="is named 'tt_linear_1'"):  # the any-step layers are never LoRA targets
        prepare_trainable(cfg, adapter, t, anystep_embeddings=True)
    with pytest.raises(lora_formats.LoraFormatError, match="no ComfyUI/kohya key"):
        lora_formats.to_kohya("qwenimage", {"transformer.pos_embed.lora_A.weight": torch.zeros(1, 2),
                                            "transformer.pos_embed.lora_B.weight": torch.zeros(2, 1)})
    adapter, unet = _bare("sdxl")  # SDXL: the attention Linears only (a resnet's convolution has no kohya LoRA here)
    cfg.lora_targets = ["to_q", "time_emb_proj"]
    with pytest.raises(lora_formats.LoraFormatError, match=r"down_blocks\.0\.resnets\.0\.time_emb_proj"):
        prepare_trainable(cfg, adapter, unet, anystep_embeddings=False)
    with pytest.raises(lora_formats.LoraFormatError, match="layers_per_block as one integer"):
        lora_formats.kohya_target("sdxl", "down_blocks.1.attentions.0.proj_in", (2, 2, 2))


def test_a_lora_target_that_names_no_module_is_refused():
    """One misspelt target among good ones is refused by name with a suggestion (peft would adapt the rest silently;
    with every target misspelt it raised its own traceback)."""
    from types import SimpleNamespace

    from fewstep.config import ConfigError
    from fewstep.lora import prepare_trainable

    adapter, t = _bare("flux")
    cfg = SimpleNamespace(model_type="lora", gradient_checkpointing=False, lora_rank=4, lora_alpha=4.0,
                          lora_dropout=0.0, lora_init_type="default",
                          lora_targets=["to_q", "to_qq", "attn.to_kk"], lora_export_formats=[])
    with pytest.raises(ConfigError, match=r"named 'to_qq' \(did you mean 'to_q'\?\), 'attn.to_kk' \(did you mean "
                                          r"'attn.to_k'\?\)"):
        prepare_trainable(cfg, adapter, t, anystep_embeddings=False)
    assert not any("lora" in name for name, _ in t.named_modules())  # refused before anything was adapted
    cfg.lora_targets = ["to_q", "single_transformer_blocks.0.proj_out"]  # a tail and a full name
    assert prepare_trainable(cfg, adapter, t, anystep_embeddings=False)


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_lora_init_type(init):
    """`lora_init_type: gaussian` (the Glance paper's code: peft's "gaussian", std 1/rank) against peft's default
    Kaiming-uniform (std 1/sqrt(3 fan_in)); B starts at zero either way, so the model is unchanged at step 0."""
    from fewstep.config import load_config
    from fewstep.lora import prepare_trainable

    adapter, t = _bare("flux")
    cfg = load_config(None, {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux", "lora_rank": 4,
                             "lora_targets": "to_q", "lora_init_type": init})
    torch.manual_seed(0)
    prepare_trainable(cfg, adapter, t, anystep_embeddings=False)
    a = torch.cat([m.weight.flatten() for n, m in t.named_modules() if n.endswith("lora_A.default")])
    b = torch.cat([m.weight.flatten() for n, m in t.named_modules() if n.endswith("lora_B.default")])
    fan_in = next(m for n, m in t.named_modules() if n.endswith("to_q.base_layer")).in_features
    want = 1 / cfg.lora_rank if init == "gaussian" else (3 * fan_in) ** -0.5
    assert a.numel() >= 256 and abs(a.std().item() / want - 1) < 0.15, (a.std().item(), want)  # 0.10 vs 0.25
    assert not b.any()


def test_export_formats_option(tmp_path):
    from fewstep_testing import REPO

    base = {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux"}
    assert load_config(None, base).lora_export_formats == ["diffusers"]
    assert load_config(None, {**base, "lora_export_formats": "diffusers, ComfyUI"}).lora_export_formats == [
        "diffusers", "comfyui"]
    sdxl = load_config(os.path.join(REPO, "configs", "twinflow", "sdxl_lora.json"),
                       {"lora_export_formats": "diffusers,comfyui"})
    assert sdxl.lora_export_formats == ["diffusers", "comfyui"]
    for bad, msg in [({"lora_export_formats": "comfyui"}, "must include 'diffusers' .*got comfyui: use "
                                                          "'diffusers,comfyui'"),
                     ({"lora_export_formats": "diffusers,kohya"}, "got kohya"),
                     ({"lora_export_formats": "diffusers,comfyui", "model_type": "full"}, "applies to LoRA runs"),
                     ({"lora_export_formats": "diffusers,comfyui", "model_family": "sd3"}, "not sd3")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, {**base, **bad})


def test_trainer_writes_both_files_for_every_export(tmp_path):
    """Through launcher/train.py: both Glance phases and their EMA exports get the ComfyUI file, and diffusers'
    Qwen-Image converter turns each back into exactly the tensors of the diffusers file beside it."""
    import subprocess

    from diffusers import QwenImagePipeline

    from fewstep_testing import PY, REPO, cpu_env, write_config, write_dataset

    backend = write_dataset(str(tmp_path), n=2)
    out = str(tmp_path / "out")
    cfg = write_config(str(tmp_path), backend, output_dir=out, model_family="qwen_image",
                       pretrained_model_name_or_path="tiny:qwen_image", method="glance", max_train_steps=1,
                       glance_slow_timesteps="1000,979", glance_fast_timesteps="500,20", lora_alpha=8,
                       use_ema=True, ema_decay=0.5, lora_export_formats="diffusers,comfyui")
    proc = subprocess.run([PY, "launcher/train.py", "--config", cfg], cwd=REPO, env=cpu_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for sub in ("glance-slow", "glance-fast", "glance-slow/ema", "glance-fast/ema"):
        d = os.path.join(out, sub)
        diffusers_sd = load_file(os.path.join(d, "pytorch_lora_weights.safetensors"))
        back = QwenImagePipeline.lora_state_dict(d, weight_name=lora_formats.COMFYUI_WEIGHTS_NAME)
        assert back.keys() == diffusers_sd.keys(), sub
        assert all(torch.equal(back[k], diffusers_sd[k]) for k in back), sub
        assert any(v.any() for k, v in back.items() if "lora_B" in k), sub  # it trained
