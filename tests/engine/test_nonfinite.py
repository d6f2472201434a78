"""fewstep.engine.nonfinite: this rank's verdict on its gradients before the optimizer step, and a skipped step that
leaves weights, fp32 masters, optimizer state and LR schedule bit-identical, in every ZeRO stage and precision."""
from fewstep_testing import run


def test_skipped_steps_leave_nothing_behind_in_every_zero_stage():
    """nonfinite_worker: 15 configurations (ZeRO 0-3 x fp32/bf16, BF16_Optimizer, FusedAdam, DeepSpeedCPUAdam, torch
    AdamW offloaded, gradient accumulation), each with a twin engine; the same checks catch the naive skips."""
    proc = run(["torchrun", "--nproc_per_node", "2", "--standalone", "tests/engine/nonfinite_worker.py"], timeout=600)
    assert proc.stdout.count("ALL NONFINITE OK") == 1
    assert proc.stdout.count("nonfinite ok:") == 15
    for layout in ("AdamW/AdamW", "FP16_UnfusedOptimizer", "FP16_Optimizer/FusedAdam", "BF16_Optimizer",
                   "DeepSpeedZeroOptimizer/AdamW", "DeepSpeedZeroOptimizer/FusedAdam",
                   "DeepSpeedZeroOptimizer_Stage3/AdamW", "DeepSpeedZeroOptimizer_Stage3/DeepSpeedCPUAdam"):
        assert f"({layout}" in proc.stdout, layout
    assert proc.stdout.count("naive-zero caught:") == 15
    assert proc.stdout.count("naive-step caught:") >= 6  # stage-0 fp32, ZeRO-3, offloaded ZeRO-1/2

