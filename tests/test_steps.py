"""fewstep.steps: the flow-matching / Glance micro-step and the training phases."""
from types import SimpleNamespace

import pytest

from fewstep.steps import build_phases, make_step
from fewstep_testing import HostToDeviceCopies, tiny_step_context


@pytest.mark.parametrize("family, method", [("flux", "flow"), ("sdxl", "flow"), ("qwen_image", "glance")])
def test_a_micro_step_never_waits_for_the_gpu(family, method):
    """A flow-matching or Glance micro-step only queues device work: on the meta device (any read of a value raises)
    it completes, and no host->device copy waits for the device's queue (see HostToDeviceCopies)."""
    glance = dict(glance_slow_timesteps="1.0,0.8", glance_fast_timesteps="0.6,0.3") if method == "glance" else {}
    ctx = tiny_step_context(family, device="meta", method=method, **glance)
    info = SimpleNamespace(is_main=True, rank=0, world_size=1)
    step = make_step(method, build_phases(ctx.cfg, info)[0], ctx)
    step(0)[0].backward()  # warm-up: diffusers' Qwen-Image copies its RoPE tables to the device once, at the first call
    with HostToDeviceCopies() as copies:
        loss, _ = step(1)
        loss.backward()
    assert loss.device.type == "meta" and not copies.blocking, copies.blocking
