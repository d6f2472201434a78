"""fewstep.twinflow_step: the rule that decides whether TwinFlow's teacher passes may run on a sub-batch."""
from types import SimpleNamespace

import pytest

from fewstep.lora import prepare_trainable
from fewstep.models import get_adapter
from fewstep.twinflow_step import has_dropout


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
    import torch

    for layer, want in ((torch.nn.Dropout2d(0.1), True), (torch.nn.AlphaDropout(0.2), True),
                        (torch.nn.Dropout(0.0), False), (torch.nn.Identity(), False)):
        assert has_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), layer)) is want
