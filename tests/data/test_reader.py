"""fewstep.data.reader: the next micro-batch is read in background threads while this one trains; a run reads the
same tensors in the same order as without it."""
import threading

import pytest
import torch

from fewstep.data.order import DataOrder
from fewstep.data.reader import BatchReader
from fewstep_testing import tiny_step_context


class Recorded:
    """A dataset whose items are (index, variant) tensors; records which thread read each."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def item(self, i, variant=0):
        self.calls.append((i, variant, threading.current_thread().name))
        if i == self.fail_at:
            raise FileNotFoundError(f"cache file of sample {i}")
        return torch.tensor([i, variant], dtype=torch.float32) + 0.5


def test_the_next_draw_is_read_ahead_in_the_background():
    ds = Recorded()
    reader = BatchReader(ds)
    first, second, third = [(0, 0), (3, 1)], [(5, 0), (1, 2)], [(2, 0), (4, 0)]
    items = reader.read(first, upcoming=second)
    assert [t.tolist() for t in items] == [[0.5, 0.5], [3.5, 1.5]]
    for f in reader._ahead[1]:  # the training step runs meanwhile; here: wait for the read-ahead
        f.result()
    main = threading.current_thread().name
    assert {(i, v) for i, v, thread in ds.calls if thread != main} == set(second)
    ds.calls.clear()
    items = reader.read(second, upcoming=third)
    assert [t.tolist() for t in items] == [[5.5, 0.5], [1.5, 2.5]]
    assert all(thread != main for _, _, thread in ds.calls)  # nothing read on the training thread
    ds.calls.clear()
    items = reader.read(first)  # not the draw read ahead (e.g. an order started again): read now, correctly
    assert [t.tolist() for t in items] == [[0.5, 0.5], [3.5, 1.5]] and reader._ahead is None
    assert [(i, v, thread) for i, v, thread in ds.calls if thread == main] == [(0, 0, main), (3, 1, main)]


def test_a_read_error_is_raised_by_the_draw_that_needs_it():
    reader = BatchReader(Recorded(fail_at=7))
    reader.read([(1, 0)], upcoming=[(7, 0)])  # the read-ahead fails in the background: nothing raised yet
    with pytest.raises(FileNotFoundError, match="sample 7"):
        reader.read([(7, 0)], upcoming=[(2, 0)])
    reader2 = BatchReader(Recorded(fail_at=7))
    reader2.read([(1, 0)], upcoming=[(7, 0)])
    assert reader2.read([(2, 0)])[0].tolist() == [2.5, 0.5]  # a read-ahead never used raises nothing


def test_next_batch_draws_the_orders_batches_in_order():
    """Through `next_batch`: each micro-batch's latents are the data order's draw, read as the dataset reads them."""
    from fewstep.step_context import next_batch

    ctx = tiny_step_context("flux", batch_size=2)
    ref = DataOrder(len(ctx.dataset), 2, 0, 1, seed=3)
    for _ in range(7):  # past an epoch of 8 samples
        x0, _, _ = next_batch(ctx)
        expect = torch.stack([ctx.dataset.item(i)[0] for i in ref.next_indices()])
        assert torch.equal(x0, expect)
    assert ctx.order.state_dict() == ref.state_dict()
