"""TwinFlow's any-step inputs for stock diffusers denoisers: a target time tt and a trajectory sign.

`add_anystep_embeddings` attaches `model.anystep_embed` and a forward hook on the module that embeds the timestep:
`time_text_embed` in every Flux/SD3/Qwen-Image transformer, `time_embedding` in a UNet2DConditionModel (SDXL). While a
state is set, the hook adds

    sign_embed[sign < 0]  +  E2(tt) * (t - tt),     E2 = Linear(SiLU(Linear(sinusoid(1000 * tt)))),

to the time embedding (TwinFlow's `temb += E2(tt) * (t - tt)`). t is the fp32 sigma that `FlowModelAdapter.forward`
puts in the state; without one (a stock pipeline called under `anystep_state(tt=..., sign=...)`) it is recovered from
the hooked module's first argument (`timestep_arg / hook_time_scale`), which in a bf16 model is sigma rounded to bf16
(spacing 2^-8 near 1), so tt = t would leave a spurious (t - tt). A UNet's `time_embedding` gets the sinusoid, not
the timestep (hook_time_scale None): there t must come from the state or a scheduler. `sign_embed` and E2's last Linear are
zero-initialised, so until trained the model output is bit-identical to the base model. With no tt and no sign set the
hook returns the output untouched.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn

ANYSTEP_WEIGHTS_NAME = "anystep_embeddings.safetensors"
FREQ_DIM = 256  # sinusoid width, as in the diffusers time_proj of Flux, SD3 and Qwen-Image


def timestep_sinusoid(t: torch.Tensor, dim: int = FREQ_DIM) -> torch.Tensor:
    """diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos | sin]."""
    half = dim // 2  # built on t's device: a table made on the CPU would be a blocking copy in every forward
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AnyStepEmbedding(nn.Module):
    """Sign and target-time embeddings added to a transformer's time embedding (zero-initialised)."""

    def __init__(self, inner_dim: int, hook_time_scale: float):
        super().__init__()
        self.hook_time_scale = None if hook_time_scale is None else float(hook_time_scale)
        self.sign_embed = nn.Embedding(2, inner_dim)
        self.tt_linear_1 = nn.Linear(FREQ_DIM, inner_dim)
        self.tt_act = nn.SiLU()
        self.tt_linear_2 = nn.Linear(inner_dim, inner_dim)
        nn.init.zeros_(self.sign_embed.weight)
        nn.init.zeros_(self.tt_linear_2.weight)
        nn.init.zeros_(self.tt_linear_2.bias)
        self.tt: torch.Tensor | float | None = None  # per-call state, set by set_anystep_state
        self.sign: torch.Tensor | float | None = None
        self.t: torch.Tensor | float | None = None  # the caller's (fp32) sigma; None: read it from the hooked input
        self.scheduler = None  # a TwinFlowScheduler inside a stock pipeline: t and tt of its current step

    def forward(self, timestep_arg: torch.Tensor, batch: int) -> torch.Tensor:
        """The [batch, inner_dim] term to add for the current state; timestep_arg is the hooked module's input."""
        w = self.tt_linear_1.weight
        out = torch.zeros(batch, w.shape[0], device=w.device, dtype=w.dtype)
        if self.sign is not None:
            sign = _per_sample(self.sign, batch, w.device, "sign")
            out = out + self.sign_embed((sign < 0).long())
        t_tt = self._scheduler_times() if self.scheduler is not None else None
        if self.tt is not None or t_tt is not None:
            t, tt = t_tt if t_tt is not None else (None, self.tt)
            tt = _per_sample(tt, batch, w.device, "tt").float()
            t = _per_sample(t, batch, w.device, "t").float() if t is not None else self._current_time(timestep_arg,
                                                                                                     batch)
            e2 = self.tt_linear_2(self.tt_act(self.tt_linear_1(timestep_sinusoid(tt * 1000.0).to(w.dtype))))
            out = out + e2 * (t - tt).to(w.dtype)[:, None]
        return out

    def _scheduler_times(self) -> tuple[float, float]:
        """(sigma_i, tt_i) of the scheduler's current step: the exact fp64 sigma (not the model-dtype timestep the
        pipeline passes) and its target time per `target_time` (few: 0, any: sigma_{i+1}, mul: sigma_i)."""
        sched = self.scheduler
        i = sched.step_index if sched.step_index is not None else (sched.begin_index or 0)
        return float(sched.sigmas[i]), float(sched.target_times()[i])

    def _current_time(self, timestep_arg: torch.Tensor, batch: int) -> torch.Tensor:
        """t as a [batch] fp32 tensor: the state's t if set, else the hooked argument over hook_time_scale."""
        device = self.tt_linear_1.weight.device
        if self.t is not None:
            return _per_sample(self.t, batch, device, "t").float()
        if self.hook_time_scale is None:
            raise ValueError("this denoiser's hooked time embedding does not see the timestep: pass t (the sigma) to "
                             "set_anystep_state / anystep_state, or a scheduler")
        return _per_sample(timestep_arg, batch, device, "timestep").float() / self.hook_time_scale


def _per_sample(v, batch: int, device, name: str) -> torch.Tensor:
    """A python float, 0-d/1-element tensor (broadcast) or [batch] tensor -> a [batch] tensor."""
    v = torch.as_tensor(v, device=device)
    if v.numel() == 1:
        return v.reshape(1).expand(batch)
    if v.shape != (batch,):
        raise ValueError(f"any-step {name} must be a float or a [B]=({batch},) tensor, got shape {tuple(v.shape)}")
    return v


def _time_embed_hook(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
    embed = module._fewstep_anystep[0]  # a list, so the embedding is not registered twice as a submodule
    if embed.tt is None and embed.sign is None and embed.scheduler is None:
        return out
    t = args[0] if args else kwargs["timestep"]
    return out + embed(t, out.shape[0]).to(out.dtype)


def add_anystep_embeddings(transformer: nn.Module, hook_time_scale: float | None,
                           module: str = "time_text_embed") -> nn.Module:
    """Attach `transformer.anystep_embed` and its hook on `transformer.<module>`; returns the embedding.

    hook_time_scale: the hooked module's first argument divided by sigma (Flux and SD3: 1000, Qwen-Image: 1; None when
    it is not the timestep, as a UNet's `time_embedding`). Idempotent: a second call returns the existing embedding.
    """
    if hasattr(transformer, "anystep_embed"):
        return transformer.anystep_embed
    tte = getattr(transformer, module, None)
    if tte is None:
        raise TypeError(f"{type(transformer).__name__} has no `{module}` module to hook any-step inputs into")
    inner_dim = embedding_width(transformer, module)
    ref = next(tte.parameters())
    embed = AnyStepEmbedding(inner_dim, hook_time_scale).to(device=ref.device, dtype=ref.dtype)
    transformer.anystep_embed = embed
    tte._fewstep_anystep = [embed]
    tte.register_forward_hook(_time_embed_hook, with_kwargs=True)
    return embed


def embedding_width(model: nn.Module, module: str | None = None) -> int:
    """Width of the any-step embedding = the hooked time embedding's: a TimestepEmbedding's output Linear (a UNet's
    `time_embedding.linear_2`: 1280 for SDXL), else the transformer's inner dim (heads x head dim). module: the hooked
    module's name; None looks at `time_embedding` and `time_text_embed`."""
    for name in ((module,) if module else ("time_embedding", "time_text_embed")):
        lin = getattr(getattr(model, name, None), "linear_2", None)
        lin = getattr(lin, "base_layer", lin)  # a LoRA target: peft's wrapper holds the Linear
        if isinstance(lin, nn.Linear):
            return lin.out_features
    return model.config.num_attention_heads * model.config.attention_head_dim


def _embed_of(transformer: nn.Module) -> AnyStepEmbedding:
    from fewstep.models.base import unwrap

    embed = getattr(unwrap(transformer), "anystep_embed", None)
    if embed is None:
        raise ValueError("this transformer has no any-step embeddings: call adapter.add_anystep(transformer) "
                         "(or add_anystep_embeddings) before passing tt/sign")
    return embed


def set_anystep_state(transformer: nn.Module, tt=None, sign=None, t=None, scheduler=None) -> None:
    """Set (or with all None, clear) the tt/sign the next forwards use; floats broadcast over the batch.

    t: the current time (sigma in [0, 1], fp32) for (t - tt); None reads it from the transformer's own timestep input,
    which is rounded to the model dtype. scheduler: a `TwinFlowScheduler` driving a stock diffusers pipeline; each
    forward then takes t and tt from its current step (its `target_time` mode), instead of tt and t.
    """
    if scheduler is not None and (tt is not None or t is not None):
        raise ValueError("set_anystep_state: give either a scheduler or tt/t, not both")
    embed = _embed_of(transformer)
    embed.tt, embed.sign, embed.t, embed.scheduler = tt, sign, t, scheduler


@contextlib.contextmanager
def anystep_state(transformer: nn.Module, tt=None, sign=None, t=None, scheduler=None):
    """Context manager: tt/sign (and t, or a scheduler) set inside the block, cleared afterwards even on error."""
    set_anystep_state(transformer, tt, sign, t, scheduler)
    try:
        yield
    finally:
        set_anystep_state(transformer)


def anystep_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The any-step weights (keys relative to `anystep_embed`), detached clones."""
    return {k: v.detach().clone() for k, v in _embed_of(transformer).state_dict().items()}


def load_anystep_state_dict(transformer: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load weights saved by `anystep_state_dict` (strict: every key must match)."""
    embed = _embed_of(transformer)
    expected = set(embed.state_dict())
    if set(sd) != expected:
        raise KeyError(f"any-step state dict keys {sorted(sd)} do not match expected {sorted(expected)}")
    embed.load_state_dict(sd)


def save_anystep(transformer: nn.Module, directory) -> Path:
    """Write the any-step weights to `directory / ANYSTEP_WEIGHTS_NAME` (fp32 safetensors); returns the path."""
    from safetensors.torch import save_file

    path = Path(directory) / ANYSTEP_WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in anystep_state_dict(transformer).items()}, str(path))
    return path


def load_anystep(transformer: nn.Module, directory) -> None:
    """Load `directory / ANYSTEP_WEIGHTS_NAME` into the transformer's any-step embeddings."""
    from safetensors.torch import load_file

    path = Path(directory) / ANYSTEP_WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"no any-step weights at {path}")
    embed = _embed_of(transformer)
    ref = embed.sign_embed.weight
    load_anystep_state_dict(transformer, {k: v.to(ref.device, ref.dtype) for k, v in load_file(str(path)).items()})
