"""fewstep.twinflow_step: the rule that decides whether TwinFlow's teacher passes may run on a sub-batch, and that the
config option reaches the loss."""
from types import SimpleNamespace

import pytest
import torch

from fewstep.lora import prepare_trainable
from fewstep.models import get_adapter
from fewstep.twinflow_step import has_dropout
from fewstep_testing import EngineWrapper


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_only_a_dropout_that_drops_keeps_the_teacher_on_the_whole_batch(family):
    """diffusers' denoisers carry Dropout(p=0) layers (no reason to run the whole batch); LoRA dropout > 0 draws
    masks, which a sub-batch would draw differently from the student pass that the teacher passes replay."""
    for dropout, want in ((0.0, False), (0.1, True)):
        adapter = get_adapter(family)
        model = adapter.load(f"tiny:{family}", with_text=False, with_vae=False).denoiser
        cfg = SimpleNamespace(model_type="lora", gradient_checkpointing=False, lora_rank=4, lora_alpha=4.0,
                              lora_dropout=dropout, lora_targets=None, lora_export_formats=["diffusers"])
        prepare_trainable(cfg, adapter, model, anystep_embeddings=family == "flux")
        assert has_dropout(model) is want


def test_every_kind_of_dropout_layer_counts():
    for layer, want in ((torch.nn.Dropout2d(0.1), True), (torch.nn.AlphaDropout(0.2), True),
                        (torch.nn.Dropout(0.0), False), (torch.nn.Identity(), False)):
        assert has_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), layer)) is want


class _Batches:
    """Eight same-shape cached samples (random, not zeros), as `next_batch` reads them."""

    def __init__(self, latent_shape, seq=8, dim=32):
        g = torch.Generator().manual_seed(0)
        self.rows = [(torch.randn(latent_shape, generator=g),
                      {"prompt_embeds": torch.randn(seq, dim, generator=g) + 1.0,
                       "pooled_prompt_embeds": torch.randn(dim, generator=g) + 1.0}) for _ in range(8)]
        self.uncond = {"prompt_embeds": torch.randn(seq, dim, generator=g), "pooled_prompt_embeds": torch.zeros(dim)}

    def __len__(self):
        return len(self.rows)

    def item(self, i):
        return self.rows[i]


def _rows_per_pass(teacher_rows: str, lora_dropout: float) -> list[int]:
    """The batch size of every model call in one TwinFlow micro-step (batch 8, order 2, adversarial branch on,
    the live student as teacher), built from a Config as the trainer builds it; same data, groups and times."""
    from fewstep.config import Config
    from fewstep.data.order import DataOrder
    from fewstep.step_context import StepContext
    from fewstep.twinflow_step import make_twinflow_step

    adapter = get_adapter("flux")
    comps = adapter.load("tiny:flux", with_text=False)
    model = comps.denoiser
    cfg = Config(model_family="flux", pretrained_model_name_or_path="tiny:flux", model_type="lora", lora_rank=4,
                 lora_alpha=4.0, lora_dropout=lora_dropout, twinflow_enabled=True, use_ema=False,
                 twinflow_allow_no_ema_teacher=True, twinflow_adversarial_enabled=True, twinflow_estimate_order=2,
                 train_batch_size=8, mixed_precision="fp32", twinflow_teacher_rows=teacher_rows)
    prepare_trainable(cfg, adapter, model, anystep_embeddings=True)
    ds = _Batches(adapter.encode_images(comps.vae, torch.zeros(1, 3, 32, 32)).shape[1:])
    ctx = StepContext(cfg=cfg, adapter=adapter, engine=EngineWrapper(model), dataset=ds,
                      order=DataOrder(len(ds), 8, 0, 1, seed=3), device=torch.device("cpu"), dtype=torch.float32)
    seen = []
    model.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs["hidden_states"].shape[0]),
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
