"""fewstep.engine.nonfinite: this rank's verdict on its gradients before the optimizer step, and a skipped step that
leaves weights, fp32 masters, optimizer state and LR schedule bit-identical, in every ZeRO stage and precision."""
import math

import pytest
import torch

from fewstep.engine import nonfinite
from fewstep_testing import run


def test_skipped_steps_leave_nothing_behind_in_every_zero_stage():
    """nonfinite_worker: 15 configurations (ZeRO 0-3 x fp32/bf16, BF16_Optimizer, FusedAdam, DeepSpeedCPUAdam, torch
    AdamW offloaded, gradient accumulation), each with a twin engine; the same checks catch the naive skips. Each
    configuration also clips by value (grad_clip_method value): the gradients Adam reads are the clamped ones."""
    proc = run(["torchrun", "--nproc_per_node", "2", "--standalone", "tests/engine/nonfinite_worker.py"], timeout=600)
    assert proc.stdout.count("ALL NONFINITE OK") == 1
    assert proc.stdout.count("nonfinite ok:") == 15
    for layout in ("AdamW/AdamW", "FP16_UnfusedOptimizer", "FP16_Optimizer/FusedAdam", "BF16_Optimizer",
                   "DeepSpeedZeroOptimizer/AdamW", "DeepSpeedZeroOptimizer/FusedAdam",
                   "DeepSpeedZeroOptimizer_Stage3/AdamW", "DeepSpeedZeroOptimizer_Stage3/DeepSpeedCPUAdam"):
        assert f"({layout}" in proc.stdout, layout
    assert proc.stdout.count("naive-zero caught:") == 15
    assert proc.stdout.count("naive-step caught:") >= 6  # stage-0 fp32, ZeRO-3, offloaded ZeRO-1/2



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squared_norms_match_fp64_on_small_and_chunked_tensors(monkeypatch, dtype):
    """Small tensors go through one multi-tensor norm, large ones in chunks (CHUNK made small here): each squared
    norm equals an fp64 reference, a non-finite value gives a non-finite norm, and huge finite values do not."""
    monkeypatch.setattr(nonfinite, "CHUNK", 100)
    gen = torch.Generator().manual_seed(0)
    tensors = [(torch.randn(n, generator=gen) * s).to(dtype) for n, s in ((7, 1.0), (100, 3.0), (101, 0.5),
                                                                          (1000, 2.0), (33, 1e30))]
    got = nonfinite._sq_norms(tensors)
    for t, g in zip(tensors, got):
        ref = t.double().pow(2).sum().item()
        assert math.isclose(g, ref, rel_tol=1e-12), (t.numel(), g, ref)
    assert math.isfinite(got[-1]) and got[-1] > 1e60  # fp32 would overflow: the norm is taken in fp64
    for i in (0, 3):  # one small, one chunked
        bad = [t.clone() for t in tensors]
        bad[i][5] = float("nan") if i else float("inf")
        sq = nonfinite._sq_norms(bad)
        assert [math.isfinite(v) for v in sq] == [j != i for j in range(len(bad))]
