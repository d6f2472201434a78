"""Tiny, seeded, randomly initialised pipelines per family, for tests and CPU smoke runs.

Each is a real diffusers pipeline folder (`save_pretrained`) with real tokenizers (a word-level vocabulary of common
caption words; unknown words map to <unk>) and real, tiny text encoders, so the same `from_pretrained` code path
as for FLUX.1 / SD3 / Qwen-Image is exercised. Every pipeline is a few MB and a transformer forward at 32x32 px
takes milliseconds. `tiny:<family>` resolves to `$FEWSTEP_CACHE/tiny/<family>-v1` (default `~/.cache/fewstep`),
built once and written atomically (temp dir + rename), so concurrent ranks can race safely.

Qwen-Image note: the pipeline wraps each prompt in a chat template and drops its first 34 tokens. The tiny
tokenizer keeps "\\n" as a token so that this template prefix is exactly 34 tokens, as with the real tokenizer.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_VERSION = "v1"
SEED = 0
# Short text budgets keep tiny forwards fast: the adapters cap the pipelines' default max_sequence_length at the
# long tokenizer's model_max_length, and CLIP pads to its tokenizer's model_max_length.
CLIP_LEN = 16
T5_LEN = 32

_NOUNS = """
cat dog bird fish horse cow sheep lion tiger bear rabbit mouse elephant monkey duck owl fox deer frog snake
man woman boy girl child person baby friend family king queen robot astronaut
car bus truck train bicycle boat ship plane airplane rocket road street bridge city town village house building
tower castle church room kitchen table chair bed sofa window door wall floor roof lamp clock book cup bottle
glass plate bowl box bag hat shirt dress shoe umbrella phone computer sign letter word text poster painting photo
tree flower leaf forest garden park field mountain hill river lake sea ocean beach rock stone island
sky cloud sun moon star storm fire shadow night day morning evening sunset apple banana cake pizza fruit
cube sphere ball circle square triangle heart line dot stripe pattern shape color object
""".split()
_WORDS = """
a an the and or of in on at to with without from by for under over above below behind near next beside between
inside outside into onto is are was were be being has have its their his her this that these those it they he she
one two three four five six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9 many few some several all no single pair
group lot red orange yellow green blue purple pink brown black white gray grey gold silver dark light bright pale
colorful big small large tiny huge little tall short long wide narrow round flat thin thick old new young people
grass sand rain snow fog wind water ice smoke light bread coffee tea food
sitting standing walking running flying swimming eating drinking holding playing reading looking wearing smiling
sleeping jumping riding
photograph picture image drawing illustration render sketch cartoon portrait landscape closeup view
style art digital oil watercolor realistic detailed beautiful cute simple abstract minimal vintage modern
describe detailing colors size texture quantity spatial relationships objects background system user
assistant foreground center left right top bottom front back side corner middle
""".split() + _NOUNS + [n + ("es" if n.endswith(("x", "ch", "sh", "s")) else "s") for n in _NOUNS]
_PUNCT = list(".,:;!?'\"-()")
_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "\n"]


def vocabulary() -> dict[str, int]:
    """The tiny word-level vocabulary: special tokens, punctuation, then unique words in a fixed order."""
    vocab = {}
    for tok in (*_SPECIAL, *_PUNCT, *_WORDS):
        vocab.setdefault(tok, len(vocab))
    return vocab


def word_tokenizer(kind: str, model_max_length: int):
    """A `PreTrainedTokenizerFast` over `vocabulary()`; kind 'clip' (<s> x </s>), 't5' (x </s>) or 'qwen' (x)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # words, punctuation runs and newlines; other whitespace is dropped
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="isolated", invert=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([tok.pre_tokenizer, pre_tokenizers.Split(Regex(r"[ \t\r]+"),
                                                                                          behavior="removed")])
    if kind == "clip":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[
            ("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
        specials = dict(bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    elif kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
        specials = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    elif kind == "qwen":
        specials = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'clip', 't5' or 'qwen'")
    tok.add_special_tokens([t for t in _SPECIAL if t != "\n"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **specials)


def _clip(hidden: int, projection: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    v = vocabulary()
    cfg = CLIPTextConfig(vocab_size=len(v), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CLIP_LEN, projection_dim=projection,
                         bos_token_id=v["<s>"], eos_token_id=v["</s>"], pad_token_id=v["</s>"])
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    v = vocabulary()
    return T5EncoderModel(T5Config(vocab_size=len(v), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=v["<pad>"],
                                   eos_token_id=v["</s>"], decoder_start_token_id=v["<pad>"]))


def _kl_vae(latent_channels: int, shift_factor: float | None = 0.1):
    from diffusers import AutoencoderKL

    # two levels: spatial factor 2; non-trivial shift/scale so latent normalisation is exercised
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=32, scaling_factor=1.5,
                         shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def _flux_parts():
    from diffusers import FluxTransformer2DModel

    return dict(
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 4, 8]),
        vae=_kl_vae(4),
        text_encoder=_clip(32, 32, with_projection=False), tokenizer=word_tokenizer("clip", CLIP_LEN),
        text_encoder_2=_t5(32), tokenizer_2=word_tokenizer("t5", T5_LEN),
    )


def _sd3_parts():
    from diffusers import SD3Transformer2DModel

    return dict(
        transformer=SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                          caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16),
        vae=_kl_vae(4),
        # CLIP hidden 16 + 16 = 32 = T5 width; pooled 32 + 32 = pooled_projection_dim
        text_encoder=_clip(16, 32, with_projection=True), tokenizer=word_tokenizer("clip", CLIP_LEN),
        text_encoder_2=_clip(16, 32, with_projection=True), tokenizer_2=word_tokenizer("clip", CLIP_LEN),
        text_encoder_3=_t5(32), tokenizer_3=word_tokenizer("t5", T5_LEN),
    )


def _qwen_parts():
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    v = vocabulary()
    n = len(v)
    text_cfg = dict(vocab_size=n + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=2048, bos_token_id=v["<|endoftext|>"],
                    eos_token_id=v["<|im_end|>"], pad_token_id=v["<|endoftext|>"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision_cfg = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                      fullatt_block_indexes=[0])
    # image/video token ids sit past the word vocabulary: prompts never contain them
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text_cfg, vision_config=vision_cfg, image_token_id=n, video_token_id=n + 1,
        vision_start_token_id=n + 2, vision_end_token_id=n + 3))
    return dict(
        transformer=QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                                guidance_embeds=False, axes_dims_rope=(8, 4, 4)),
        vae=AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                   temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.05, 0.0],
                                   latents_std=[1.5, 0.8, 1.2, 1.0]),
        text_encoder=text_encoder, tokenizer=word_tokenizer("qwen", 1024 + 34),
    )


def _sdxl_parts():
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    # SDXL's layout at toy width: CLIP hidden 32 + 32 = cross_attention_dim; add_embedding input = 6 time ids x 8 +
    # the pooled 32. SDXL's VAE has no shift factor (the stock pipeline ignores one).
    return dict(
        unet=UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                  transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4),
                                  cross_attention_dim=64, use_linear_projection=True, norm_num_groups=8,
                                  addition_embed_type="text_time", addition_time_embed_dim=8,
                                  projection_class_embeddings_input_dim=6 * 8 + 32),
        vae=_kl_vae(4, shift_factor=None),
        text_encoder=_clip(32, 32, with_projection=False), tokenizer=word_tokenizer("clip", CLIP_LEN),
        text_encoder_2=_clip(32, 32, with_projection=True), tokenizer_2=word_tokenizer("clip", CLIP_LEN),
        # SDXL base 1.0's scheduler config: scaled-linear betas, epsilon prediction
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         prediction_type="epsilon", timestep_spacing="leading", steps_offset=1),
    )


_BUILDERS = {"flux": _flux_parts, "sd3": _sd3_parts, "qwenimage": _qwen_parts, "sdxl": _sdxl_parts}


def build_tiny_pipeline(family: str):
    """Build the tiny pipeline object for `family` with seeded weights (the global RNG is left untouched)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.models import get_adapter

    adapter = get_adapter(family)
    if adapter.family not in _BUILDERS:
        raise ValueError(f"no tiny pipeline for family {adapter.family!r}; have {sorted(_BUILDERS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        parts = _BUILDERS[adapter.family]()
    # flow families: shift 1, no dynamic shifting (custom sigmas are used verbatim)
    parts.setdefault("scheduler", FlowMatchEulerDiscreteScheduler())
    return adapter.pipeline_cls(**parts)


def save_tiny_pipeline(family: str, path: str | os.PathLike) -> Path:
    """Build the tiny pipeline for `family` and `save_pretrained` it (fp32 safetensors) into `path`.

    Works on any rank of a process group: transformers (5.x) writes nothing from `save_pretrained` on a rank other
    than 0 once torch.distributed is initialised (`should_save_on_this_rank`), which left a rank that won the race in
    `ensure_tiny_pipeline` with empty text-encoder folders. Each process writes its own private copy here, so every
    text encoder is told to write, and a folder without its weights is an error, never renamed into the cache."""
    path = Path(path)
    pipe = build_tiny_pipeline(family)
    encoders = {name: c for name, c in pipe.components.items() if hasattr(c, "should_save_on_this_rank")}
    for model in encoders.values():
        model.should_save_on_this_rank = lambda is_main_process: True
    pipe.save_pretrained(str(path), safe_serialization=True)
    empty = [name for name in encoders if not (path / name / "model.safetensors").exists()]
    if empty:
        raise RuntimeError(f"save_pretrained wrote no weights for {empty} in {path} (transformers skips the write on "
                           "ranks other than 0 of a process group)")
    return path


def tiny_cache_dir(family: str) -> Path:
    """Where `tiny:<family>` lives: `$FEWSTEP_CACHE/tiny/<family>-v1` (default root `~/.cache/fewstep`)."""
    root = Path(os.environ.get("FEWSTEP_CACHE") or Path.home() / ".cache" / "fewstep").expanduser()
    return root / "tiny" / f"{family}-{TINY_VERSION}"


def ensure_tiny_pipeline(family: str) -> Path:
    """The cached tiny pipeline directory for `family`, built atomically on first use."""
    final = tiny_cache_dir(family)
    if (final / "model_index.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        save_tiny_pipeline(family, tmp)
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not (final / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
