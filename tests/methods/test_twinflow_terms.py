"""Two TwinFlow terms weighed as the reference weighs them: the CFG-enhanced target of a frozen teacher (EMA decay 1),
and L_rectify when the groups cycle over gradient-accumulation micro-steps."""
import pytest
import torch
from torch import nn

from fewstep.methods.twinflow import twinflow_loss
from fewstep.methods.twinflow_times import MUL, assign_groups, rectify_rows, steps_for_every_group
from test_twinflow_loss import KW, SHAPE, batch, bc


@pytest.mark.parametrize("frozen", [False, True])
def test_a_frozen_teacher_is_distilled_at_cfg_scale_ratio(frozen):
    """With a frozen teacher (EMA decay 1) and ratio 1 the flow-matching rows' target is the teacher's conditional
    field itself (the reference replaces the base by F_T(uncond)): a student equal to the teacher has zero loss
    there. An EMA teacher's target is v + (F_T(cond) - F_T(uncond)), which the same student does not match."""
    def model(x, t, tt, cond):  # ignores tt: at (t, t_min) the student computes what the teacher does at (t, t)
        return x * 0.5 + bc(t, x) * cond["c"].reshape(-1, 1, 1, 1).to(x.dtype)

    torch.manual_seed(0)
    x0, cond, uncond = batch(6)
    groups = torch.full((6,), MUL, dtype=torch.long)
    loss, logs = twinflow_loss(model, model, x0, cond, uncond, groups=groups,
                               **{**KW, "order": 0, "adversarial": False, "enhanced_ratio": 1.0,
                                  "frozen_teacher": frozen})
    assert logs["n_enhanced"] == 6
    if frozen:
        assert loss.item() == 0.0
    else:
        assert loss.item() > 1e-3


class SignOffset(nn.Module):
    """F = p x + sign(t) a: the fake (-t) and real (+t) fields differ by -2a everywhere, so every e2e row's L_rectify
    term is the same number, whatever the draws."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(0.5))
        self.a = torch.linspace(-0.2, 0.3, SHAPE[0]).reshape(1, -1, 1, 1)

    def forward(self, x, t, tt, cond):
        return self.p * x + torch.where(t < 0, -1.0, 1.0).reshape(-1, 1, 1, 1) * self.a


@pytest.mark.parametrize("B", [1, 2, 3, 4, 8])
def test_rectify_weighs_the_same_at_every_batch_size(B):
    """Gradient accumulation over the groups' cycle weighs L_rectify as one batch of all its rows does: at a batch
    smaller than the cycle (4 groups) each micro-step holds 0 or 1 e2e rows, and L_rectify's mean over them would
    count an e2e row B/4 as much as a batch of 4 does (the other terms are sums over rows / batch, which
    accumulation averages right). Over 4 micro-steps (every group equally often) the mean L_rectify is the batch
    of 4's."""
    def mean_rectify(batch_size, steps):
        total = 0.0
        for micro in range(steps):
            x0, cond, uncond = batch(batch_size, seed=micro)
            _, logs = twinflow_loss(SignOffset(), SignOffset(), x0, cond, uncond,
                                    groups=assign_groups(batch_size, micro), rectify_rows=rectify_rows(batch_size),
                                    **{**KW, "enhanced_ratio": 0.0})
            total += logs["l_rectify"].item()
        return total / steps

    assert steps_for_every_group(B) <= 4
    reference = mean_rectify(4, 1)  # one e2e row in a batch of 4: the reference's mean
    assert reference > 0
    assert mean_rectify(B, 4 if B < 4 else 1) == pytest.approx(reference, rel=1e-6)


def test_rectify_rows_with_weighted_groups():
    """With `twinflow_group_weights` the cycle is the weights' sum and the e2e share its own: weights (2, 1, 1, 2) at
    batch 4 cycle 6 rows, 2 of them e2e, so a micro-step has 4 x 2/6 on average; a batch of the whole cycle (6+)
    takes the mean."""
    assert rectify_rows(4, weights=[2, 1, 1, 2]) == pytest.approx(4 / 3)
    assert rectify_rows(6, weights=[2, 1, 1, 2]) is None
    assert rectify_rows(3) == pytest.approx(0.75) and rectify_rows(4) is None
