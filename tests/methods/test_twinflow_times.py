"""TwinFlow's batch groups, their times and loss weights (fewstep.methods.twinflow_times)."""
import math

import pytest
import torch

from fewstep.methods.twinflow_times import (ADV, ANY, E2E, MUL, assign_groups, sample_times, steps_for_every_group,
                                            time_weight)


@pytest.mark.parametrize("B, sizes", [(4, [1, 1, 1, 1]), (5, [1, 1, 1, 2]), (6, [1, 1, 1, 3]), (8, [2, 2, 2, 2]),
                                      (10, [2, 2, 2, 4])])
def test_assign_groups_contiguous(B, sizes):
    expected = sum(([g] * n for g, n in zip((E2E, MUL, ANY, ADV), sizes)), [])
    for k in range(3):  # the split does not depend on the micro-step
        g = assign_groups(B, k)
        assert g.dtype == torch.long and g.tolist() == expected


@pytest.mark.parametrize("B, adversarial, sizes", [(7, True, [2, 2, 2, 1]), (11, True, [3, 3, 3, 2]),
                                                   (5, False, [2, 2, 1])])
def test_assign_groups_rounds_group_sizes_to_nearest(B, adversarial, sizes):
    """Each group but the last gets round(B/K) rows, the last the rest (the reference's split: 7/4 = 1.75 -> 2,
    11/4 = 2.75 -> 3, 5/3 = 1.67 -> 2); flooring would pile the remainder on the last group (7: 1, 1, 1, 4)."""
    expected = sum(([g] * n for g, n in zip((E2E, MUL, ANY, ADV), sizes)), [])
    assert assign_groups(B, 0, adversarial=adversarial).tolist() == expected


@pytest.mark.parametrize("B", [1, 2, 3])
def test_assign_groups_cycles_small_batches(B):
    steps = [assign_groups(B, k) for k in range(4)]
    assert all(s.shape == (B,) for s in steps)
    counts = torch.bincount(torch.cat(steps), minlength=4)
    assert counts.tolist() == [B] * 4  # every group equally often over 4 micro-steps
    assert steps[0].tolist() == [i % 4 for i in range(B)]
    assert steps[1].tolist() == [(B + i) % 4 for i in range(B)]


def test_assign_groups_weighted_shares():
    # equal weights are the reference split exactly
    assert all(assign_groups(b, k, weights=[3, 3, 3, 3]).tolist() == assign_groups(b, k).tolist()
               for b in (2, 6, 10) for k in range(3))
    # B >= sum(w): contiguous groups sized by largest remainder of B * w / sum(w)
    assert torch.bincount(assign_groups(8, 0, weights=[2, 1, 1, 1]), minlength=4).tolist() == [3, 2, 2, 1]
    assert torch.bincount(assign_groups(32, 5, weights=[3, 1, 1, 1]), minlength=4).tolist() == [16, 6, 5, 5]
    # B < sum(w): the pattern e2e, e2e, mul, any, adv cycles over micro-steps, each group w times per cycle
    steps = torch.cat([assign_groups(2, k, weights=[2, 1, 1, 1]) for k in range(5)])
    assert steps.tolist()[:5] == [E2E, E2E, MUL, ANY, ADV]
    assert torch.bincount(steps, minlength=4).tolist() == [4, 2, 2, 2]
    # without the adversarial branch the adv weight is ignored (a tie in the remainders goes to the earlier group)
    assert assign_groups(6, 0, adversarial=False, weights=[2, 1, 1, 9]).tolist() == [E2E, E2E, E2E, MUL, MUL, ANY]
    for bad in ([0, 1, 1, 1], [1.5, 1, 1, 1], [1, 1, 1]):
        with pytest.raises(ValueError, match="positive integers"):
            assign_groups(8, 0, weights=bad)


@pytest.mark.parametrize("adversarial, weights", [(True, None), (False, None), (True, [2, 1, 1, 1]),
                                                  (False, [1, 3, 1, 1])])
def test_steps_for_every_group_is_what_the_cycle_needs(adversarial, weights):
    """`steps_for_every_group` (the start-up note's advice) is the fewest micro-steps in which `assign_groups` gives
    an optimizer step every group, from any starting micro-step of a run."""
    k = 4 if adversarial else 3
    for batch in range(1, 8):
        need = steps_for_every_group(batch, adversarial=adversarial, weights=weights)

        def covers(n, start):
            rows = torch.cat([assign_groups(batch, start + m, adversarial=adversarial, weights=weights)
                              for m in range(n)])
            return set(rows.tolist()) == set(range(k))
        # an optimizer step of `need` micro-steps starts at a multiple of `need`
        assert all(covers(need, step * need) for step in range(12)), (batch, need)
        assert need == 1 or not all(covers(need - 1, step * (need - 1)) for step in range(12)), (batch, need)


def test_assign_groups_without_adversarial():
    assert assign_groups(6, 0, adversarial=False).tolist() == [E2E, E2E, MUL, MUL, ANY, ANY]
    assert assign_groups(4, 0, adversarial=False).tolist() == [E2E, MUL, ANY, ANY]
    steps = torch.cat([assign_groups(2, k, adversarial=False) for k in range(3)])
    assert torch.bincount(steps, minlength=4).tolist() == [2, 2, 2, 0]
    with pytest.raises(ValueError, match="batch_size"):
        assign_groups(0, 0)


def test_sample_times_table():
    groups = assign_groups(400, 0)
    t, tt = sample_times(groups, torch.Generator().manual_seed(0))
    e2e, mul, any_, adv = (groups == g for g in (E2E, MUL, ANY, ADV))
    assert (t[e2e] == 1).all() and (tt[e2e] == 0).all()
    assert ((t[mul] > 0) & (t[mul] <= 1)).all() and (tt[mul] <= t[mul]).all() and (tt[mul] >= 0.95 * t[mul]).all()
    assert (tt[any_] <= t[any_]).all() and (tt[any_] >= 0).all()
    assert (t[adv] < 0).all() and (t[adv] == tt[adv]).all() and (t[adv] >= -1).all()
    # t ~ U(0, 1): mean 1/2, variance 1/12; any: tt/t ~ U(0, 1)
    tm = t[mul | any_]
    assert abs(tm.mean().item() - 0.5) < 0.07 and abs(tm.var().item() - 1 / 12) < 0.03
    assert abs((tt[any_] / t[any_]).mean().item() - 0.5) < 0.1
    t2, tt2 = sample_times(groups, torch.Generator().manual_seed(0))
    assert torch.equal(t, t2) and torch.equal(tt, tt2)


def test_time_weight():
    t = torch.tensor([1.0, 0.7, 0.5, -0.3])
    tt = torch.tensor([0.0, 0.7, 0.25, -0.3])
    w = time_weight(t, tt, torch.tensor([False, False, False, True]))
    expected = [1.0, 1 + math.tan(2 * math.pi / 5), 1 + math.tan(0.75 * math.pi / 2.5), 1.0]
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-6, atol=0)
