"""fewstep.config_warnings: settings a run accepts but that cannot act as written get one warning each; a config
without such settings gets none."""
from fewstep.config import load_config
from fewstep.config_warnings import config_warnings

BASE = {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux"}


def warnings_of(**options):
    return config_warnings(load_config(None, {**BASE, **options}))


def test_a_plain_config_has_no_warnings():
    assert warnings_of() == []
    assert warnings_of(lora_rank=8, lr_warmup_steps=10, max_train_steps=11) == []  # LoRA keys of a LoRA run
    assert warnings_of(model_type="full") == []  # the LoRA defaults (alpha follows the rank)


def test_each_setting_without_effect_is_named():
    full = warnings_of(model_type="full", lora_rank=8, lora_targets="to_q")
    assert full == ["lora_rank, lora_targets not used: model_type full trains every weight of the denoiser"]
    assert warnings_of(diff2flow_enabled=True) == [
        "diff2flow_enabled has no effect on model_family flux: it is a flow-matching model already (diff2flow "
        "bridges sdxl)"]
    assert warnings_of(lr_warmup_steps=10, max_train_steps=2, learning_rate=3e-4) == [
        "lr_warmup_steps 10 >= max_train_steps 2: the learning rate never reaches learning_rate 0.0003"]
    twinflow = dict(twinflow_enabled=True, use_ema=True)
    assert warnings_of(**twinflow, validation_guidance=3.5) == [
        "validation_guidance 3.5 not used: TwinFlow samples without classifier-free guidance (its target distils "
        "it), at the training guidance value"]
    assert warnings_of(**twinflow, validation_guidance=0.0) == []  # SimpleTuner's TwinFlow recipe gives 0
    glance = warnings_of(method="glance", glance_slow_timesteps="1000,900", glance_fast_timesteps="500,100",
                         lr_warmup_steps=5, max_train_steps=5)
    assert glance and "max_train_steps 5 per Glance phase" in glance[0]
