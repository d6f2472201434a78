"""bench/train_step.py runs end to end on CPU in smoke mode (no figures asserted: CPU timings are not results)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from fewstep_testing import PY, run

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "train_step.py"


def test_train_step_smoke(tmp_path):
    """SDXL's TwinFlow step (Qwen-Image's TwinFlow and flow steps run in bench/gpu_check.sh's dry run, checked in
    tests/bench/test_gpu_check_dry.py)."""
    family, method = "sdxl", "twinflow"
    out = tmp_path / "r.json"
    run([PY, "bench/train_step.py", "--smoke", "--family", family, "--method", method, "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["device"].startswith("cpu") and res["method"] == method and res["family"] == family
    for k in ("s_per_step", "tflop_per_step", "model_pass_share", "non_model_share"):
        assert math.isfinite(res[k]) and res[k] > 0, k
    assert res["params_trainable"] > 0 and res["blocks"] > 0


def test_reduced_depth_architectures():
    """--depth K: K transformer blocks at real width; the SDXL UNet keeps its widths and resnets and caps each level's
    transformer depth (1, 2, 10) -> (1, 2, 2). Built on meta: the shapes of the GPU benchmark, no memory."""
    import diffusers

    spec = importlib.util.spec_from_file_location("train_step", SCRIPT)
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)

    def build(family, depth):
        cls, kwargs = ts.model_kwargs(family, depth)
        with torch.device("meta"):
            return getattr(diffusers, cls).from_config(kwargs)

    full, small = build("sdxl", None), build("sdxl", 2)
    assert small.config.transformer_layers_per_block == [1, 2, 2]
    assert small.config.block_out_channels == full.config.block_out_channels == [320, 640, 1280]
    # BasicTransformerBlocks: down levels 1, 2: 2 attentions x (2, 10); mid: 10; up levels 0, 1: 3 attentions x (10, 2)
    assert ts.transformer_blocks(full) == 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2 == 70
    assert ts.transformer_blocks(small) == 2 * 2 + 2 * 2 + 2 + 3 * 2 + 3 * 2
    resnets = lambda m: sum(1 for n, _ in m.named_modules() if n.rsplit(".", 2)[-2:-1] == ["resnets"])  # noqa: E731
    assert resnets(small) == resnets(full) == 2 * 3 + 2 + 3 * 3
    assert ts.transformer_blocks(build("qwen_image", 8)) == 8
    with pytest.raises(SystemExit, match="only --method twinflow"):
        ts.main(["--smoke", "--family", "sdxl", "--method", "flow"])
