"""bench/train_step.py runs end to end on CPU in smoke mode (no figures asserted: CPU timings are not results)."""
import json
import math

import pytest

from fewstep_testing import PY, run


@pytest.mark.parametrize("method", ["twinflow", "flow"])
def test_train_step_smoke(tmp_path, method):
    out = tmp_path / "r.json"
    run([PY, "bench/train_step.py", "--smoke", "--family", "qwen_image", "--method", method, "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["device"].startswith("cpu") and res["method"] == method
    for k in ("s_per_step", "tflop_per_step", "model_pass_share", "non_model_share"):
        assert math.isfinite(res[k]) and res[k] > 0, k
    assert res["params_trainable"] > 0
