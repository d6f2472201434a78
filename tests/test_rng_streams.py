"""fewstep.rng_streams: a rank's stream is its own generators, including its own GPU's and no other."""
import torch

from fewstep import rng_streams


class _FakeGPUs:
    """torch.cuda's RNG calls for a process on GPU `current` of `count` visible ones (state = a byte tensor)."""

    def __init__(self, count: int, current: int):
        self.states = [torch.full((4,), i, dtype=torch.uint8) for i in range(count)]
        self.current = current

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: len(self.states))
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "get_rng_state", lambda device="cuda": self.states[self.current].clone())
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])

        def set_one(state, device="cuda"):
            self.states[self.current] = state.clone()

        def set_all(states):  # as torch: one state per index, into default_generators[index]
            for i, s in enumerate(states):
                self.states[i] = s.clone()  # IndexError past the visible GPUs

        monkeypatch.setattr(cuda, "set_rng_state", set_one)
        monkeypatch.setattr(cuda, "set_rng_state_all", set_all)


def test_a_resume_on_fewer_gpus_or_another_index_restores_this_ranks_own_gpu(monkeypatch):
    saved_on = _FakeGPUs(count=8, current=5)  # rank on GPU 5 of an 8-GPU node
    saved_on.states[5] = torch.tensor([7, 7, 7, 7], dtype=torch.uint8)
    saved_on.install(monkeypatch)
    snapshot = rng_streams.state()

    resumed_on = _FakeGPUs(count=4, current=1)  # resumed on a 4-GPU node, this rank now on GPU 1
    resumed_on.install(monkeypatch)
    rng_streams.set_state(snapshot)
    assert resumed_on.states[1].tolist() == [7, 7, 7, 7]  # its own stream, where it now runs
    assert [s.tolist() for i, s in enumerate(resumed_on.states) if i != 1] == [[i] * 4 for i in (0, 2, 3)]


def test_a_checkpoint_with_every_gpus_state_still_restores(monkeypatch):
    gpus = _FakeGPUs(count=2, current=1)
    gpus.install(monkeypatch)
    every_gpu = [torch.full((4,), 9, dtype=torch.uint8), torch.full((4,), 8, dtype=torch.uint8)]
    old = {**rng_streams.state(), "cuda": every_gpu}  # the format before 2026-12-05
    rng_streams.set_state(old)
    assert gpus.states[1].tolist() == [8, 8, 8, 8] and gpus.states[0].tolist() == [0] * 4


def test_any_seed_the_config_takes_seeds_every_rank():
    """Seeds up to 2**64 - 1 are taken (as sample.py's --seed); each rank's derived seed (seed * 7919 + rank) wraps
    into torch's unsigned 64-bit range instead of overflowing, and 2**64 is refused in one line."""
    import pytest

    from fewstep import rng_streams
    from fewstep.config import ConfigError, load_config

    base = {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux"}
    top = load_config(None, {**base, "seed": 2 ** 64 - 1}).seed
    with rng_streams.isolated():
        rng_streams.seed(rng_streams.rank_seed(top, 3))
        a = torch.rand(4)
        rng_streams.seed((top * 7919 + 3) % 2 ** 64)
        assert torch.equal(a, torch.rand(4))
    for key in ("seed", "validation_seed"):
        with pytest.raises(ConfigError, match=key):
            load_config(None, {**base, key: 2 ** 64})
