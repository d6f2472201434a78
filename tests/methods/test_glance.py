import collections

import pytest
import torch

from fewstep.methods.glance import CustomTimestepSampler, TimestepListError, glance_schedule, parse_custom_timesteps


def test_parse_forms_and_scale():
    assert parse_custom_timesteps("1000,979.1915") == pytest.approx([1.0, 0.9791915])
    assert parse_custom_timesteps("[0.9, 0.5]") == [0.9, 0.5]
    assert parse_custom_timesteps([886.7053, 20.0]) == pytest.approx([0.8867053, 0.02])
    assert parse_custom_timesteps("0.9; 0.2") == [0.9, 0.2]
    assert parse_custom_timesteps(0.5) == [0.5]
    # 1 is the largest sigma and the smallest nonzero timestep: a sigma list starting at 1 stays sigmas, a lone 1 is
    # sigma 1, and a timestep list may go down to 1
    assert parse_custom_timesteps("1.0,0.9791915") == [1.0, 0.9791915]
    assert parse_custom_timesteps("1") == [1.0]
    assert parse_custom_timesteps("1000,500,1") == [1.0, 0.5, 0.001]


@pytest.mark.parametrize("value, message", [("", "empty"), ("[]", "empty"), ("1,inf", "non-finite"),
                                            ("1001, 3", "out of range"), ("-1", "negative"), ("a,b", "not a number"),
                                            ("[1,", "not a valid JSON list"),
                                            ("0.5,800", "0.5 reads as a sigma but 800.0 as a timestep"),
                                            # JSON's true/false are not timesteps (float(True) is 1.0: sigma 1)
                                            (True, "must be a list of numbers, got True"),
                                            ([900, False], "False is not a number"),
                                            ("[true, 0.5]", "True is not a number")])
def test_parse_errors(value, message):
    with pytest.raises(TimestepListError, match=message):
        parse_custom_timesteps(value)


def test_fixed_list_draws_only_members_uniformly():
    sig = [1.0, 0.9791915, 0.9575157, 0.9349171, 0.9113354]
    s = CustomTimestepSampler(sig, "fixed-list", batch_size=64)
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([s.sample(g) for _ in range(100)])
    members = torch.tensor(sig)
    assert torch.isin(draws, members).all()
    counts = collections.Counter(draws.tolist())
    assert len(counts) == 5 and min(counts.values()) > 0.8 * 6400 / 5  # roughly uniform


def test_round_robin_cycles_exactly_across_ranks_and_resume():
    sig = [0.9, 0.7, 0.5, 0.3, 0.1]
    ranks = [CustomTimestepSampler(sig, "round-robin", batch_size=2, rank=r, world_size=2) for r in range(2)]
    seq = []
    for _ in range(5):
        for s in ranks:
            seq += s.sample().tolist()
    expected = [sig[i % 5] for i in range(20)]
    assert seq == pytest.approx(expected)
    fresh = CustomTimestepSampler(sig, "round-robin", batch_size=2, rank=1, world_size=2)
    fresh.load_state_dict(ranks[1].state_dict())
    nxt = ranks[1].sample().tolist()
    assert fresh.sample().tolist() == nxt
    # a resume in the middle of the cycle (cursor 4 of 5, not 0 as after 20 draws) continues it
    assert ranks[1].state_dict()["cursor"] != 0
    fresh.load_state_dict(ranks[1].state_dict())
    assert fresh.sample().tolist() == ranks[1].sample().tolist()


def test_round_robin_warns_when_the_list_is_shorter_than_the_global_batch():
    """The cycle is walked by the global batch (batch x ranks): 5 sigmas over 4 ranks of 2 repeat within a step."""
    with pytest.warns(UserWarning, match="shorter than the global batch \\(8\\)"):
        CustomTimestepSampler([0.9, 0.7, 0.5, 0.3, 0.1], "round-robin", batch_size=2, rank=0, world_size=4)


def test_mode_typo_is_an_error():
    with pytest.raises(TimestepListError, match="round-robin"):
        CustomTimestepSampler([0.5], "round_robin")


def test_glance_schedule_is_slow_then_fast_then_zero():
    sigmas, boundary = glance_schedule([1.0, 0.97], [0.88, 0.3])
    assert sigmas == [1.0, 0.97, 0.88, 0.3, 0.0] and boundary == 2
    with pytest.raises(TimestepListError, match="Slow's lowest is 0.5, Fast's highest 0.6"):
        glance_schedule([1.0, 0.5], [0.6, 0.1])
    with pytest.raises(TimestepListError, match="Slow's lowest is 0.5, Fast's highest 0.5"):  # a zero-length step
        glance_schedule([1.0, 0.5], [0.5, 0.1])


def test_glance_lists_are_sets_of_sigmas():
    """Training draws from each list in any order, so the schedule is the same whatever the order and repeats the user
    wrote them in (SimpleTuner users write ascending lists too), and a Fast list given down to 0, the end of sampling,
    takes no step there."""
    expected = glance_schedule([1.0, 0.97], [0.88, 0.3])
    assert glance_schedule([0.97, 1.0, 0.97], [0.3, 0.88]) == expected
    assert glance_schedule([1.0, 0.97], [0.0, 0.88, 0.3, 0.3]) == expected
    with pytest.raises(TimestepListError, match="the Fast list needs a sigma > 0"):
        glance_schedule([1.0], [0.0])


def test_flux_reference_lists_are_its_50_step_schedule_and_a_qwen_list_on_flux_is_flagged():
    """The paper's FLUX.1 lists are FLUX's own shifted 50-step schedule (dynamic shift mu = 1.15 at 1024 px) at steps
    1, 3, 5, 7, 9 (Slow) and 11, 21, 31, 41, 50 (Fast), derived here with diffusers' scheduler; a Qwen-Image list
    given to FLUX (as SimpleTuner's GLANCE.md does) is named, with FLUX's own list; a family's own list is not."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.methods.glance import REFERENCE_TIMESTEPS, foreign_reference_list

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 50, 50), mu=1.15)
    ts = sched.sigmas[:-1].double() * 1000
    slow, fast = REFERENCE_TIMESTEPS["flux"]["FLUX.1-dev"]
    assert torch.allclose(ts[[0, 2, 4, 6, 8]], torch.tensor(slow, dtype=torch.float64), rtol=1e-6, atol=2e-4)
    assert torch.allclose(ts[[10, 20, 30, 40, 49]], torch.tensor(fast, dtype=torch.float64), rtol=1e-6, atol=2e-4)

    qwen_slow, qwen_fast = REFERENCE_TIMESTEPS["qwen_image"]["Qwen-Image"]
    note = foreign_reference_list("flux", parse_custom_timesteps(qwen_slow))
    assert note and "Qwen-Image's Slow list" in note and "986.9786" in note
    assert "Qwen-Image's Fast list" in foreign_reference_list("flux", parse_custom_timesteps(qwen_fast))
    assert "FLUX.1-dev's Fast list" in foreign_reference_list("qwen_image", parse_custom_timesteps(fast))
    assert foreign_reference_list("qwen_image", parse_custom_timesteps(qwen_slow)) is None
    assert foreign_reference_list("flux", parse_custom_timesteps(slow)) is None
    assert foreign_reference_list("flux", parse_custom_timesteps(qwen_slow[:4])) is None  # an edited list: the user's


def test_a_list_trained_alone_samples_at_its_sigmas_and_the_base_schedule_elsewhere():
    from fewstep.methods.glance import listed_schedule
    from fewstep.sampling import flow_sigmas

    base = flow_sigmas(8)  # 1, 0.875, ..., 0.125
    slow = [1.0, 0.9791915, 0.9575157]  # a Slow list alone: the base continues below it, not a jump to 0
    sigmas, on_list = listed_schedule(slow, base)
    assert sigmas == [1.0, 0.9791915, 0.9575157] + [s for s in base if s < 0.9575157] + [0.0]
    assert on_list == [True, True, True] + [False] * (len(sigmas) - 4)
    fast = [0.5, 0.3, 0.06]  # a Fast list alone: the base brings pure noise down to its first sigma
    sigmas, on_list = listed_schedule(fast, base)
    above = [s for s in base if s > 0.5]
    assert sigmas == above + [0.5, 0.3, 0.06, 0.0] and on_list == [False] * len(above) + [True] * 3
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))  # strictly decreasing, base sigmas inside the list dropped
    assert listed_schedule([0.3, 0.5, 0.5], base) == listed_schedule([0.5, 0.3], base)  # a round-robin list's order
