"""The bucketed data order: one bucket per step on every rank, disjoint rank shares, exact resume, entry
probabilities, repeats and caption variants, and the memory an order holds."""
import tracemalloc
from collections import Counter

import numpy as np
import pytest
import torch

from fewstep.data.backends import ImageEntry
from fewstep.data.buckets import Plan
from fewstep.data.dataset import Sample, build_layout
from fewstep.data.errors import DataError
from fewstep.data.order import DataOrder, Layout, Stream
from fewstep_testing import sample_table


def layout_of(sizes, entries=None, variants=None):
    """Streams of the given sizes over consecutive dataset indices; `entries`: (name, weight, stream ids)."""
    streams, start = [], 0
    for j, n in enumerate(sizes):
        streams.append(Stream(f"s{j}", list(range(start, start + n))))
        start += n
    return Layout(streams, entries or [("all", 1.0, list(range(len(sizes))))], variants or [1] * start)


def stream_of(layout, i):
    return next(j for j, s in enumerate(layout.streams) if i in s.items)


def draw(orders, layout, steps):
    """[[rank0 items, rank1 items, ...] per step]."""
    return [[o.next_items(layout) for o in orders] for _ in range(steps)]


def test_every_step_is_one_bucket_and_ranks_take_disjoint_samples():
    layout = layout_of([8, 4, 12])  # multiples of the global batch: no epoch ends inside a step
    orders = [DataOrder(24, 2, r, 2, seed=5) for r in range(2)]
    seen = Counter()
    for step in draw(orders, layout, 24):  # 4 rounds of 6 steps
        idx = [i for rank in step for i, _ in rank]
        assert len({stream_of(layout, i) for i in idx}) == 1  # one bucket for the whole step, every rank
        assert len(set(idx)) == 4  # disjoint shares
        seen.update(idx)
    assert seen == Counter({i: 4 for i in range(24)})  # every sample once per round
    assert orders[0].state_dict() == orders[1].state_dict()  # the state does not depend on the rank


def test_buckets_are_used_in_proportion_to_their_size():
    layout = layout_of([10, 3, 1])
    order = DataOrder(14, 2, 0, 1, seed=1)
    steps = [stream_of(layout, order.next_items(layout)[0][0]) for _ in range(5 * 14)]
    for r in range(5):  # two rounds (6 + 8 batches of 2) hold every sample once: 10/2, 3/2 and 1/2 batches a round
        assert Counter(steps[14 * r:14 * (r + 1)]) == {0: 10, 1: 3, 2: 1}
    assert steps[:14] != steps[14:28]  # each round shuffled anew


def test_a_bucket_smaller_than_the_global_batch_is_not_oversampled():
    """One odd-sized image beside a thousand: each image is drawn about equally often. Each bucket once had a
    whole global batch every round, so the one image made 64 draws for every draw of the others."""
    layout = layout_of([1000, 3, 1])
    order = DataOrder(1004, 64, 0, 1, seed=2)  # a global batch of 64: 8 ranks x 8, as one rank
    draws = Counter(i for _ in range(8000) for i, _ in order.next_items(layout))  # 510 passes over the data
    per_image = [sum(draws[i] for i in range(a, b)) / (b - a) for a, b in ((0, 1000), (1000, 1003), (1003, 1004))]
    assert max(per_image) / min(per_image) < 1.3, per_image  # the one image comes 64 at a time, every 64th pass


@pytest.mark.parametrize("world", [1, 2])
def test_resume_mid_epoch_gives_the_identical_sequence(world):
    layout = layout_of([5, 3, 2], entries=[("a", 0.7, [0, 1]), ("b", 0.3, [2])], variants=[1, 3, 1, 2, 1, 1, 1,
                                                                                           1, 4, 1])
    straight = [DataOrder(10, 2, r, world, seed=9) for r in range(world)]
    ref = draw(straight, layout, 13)
    first = [DataOrder(10, 2, r, world, seed=9) for r in range(world)]
    draw(first, layout, 6)  # interrupted mid-epoch
    resumed = [DataOrder(10, 2, r, world, seed=9) for r in range(world)]
    for o, f in zip(resumed, first):
        o.load_state_dict(f.state_dict())
    assert draw(resumed, layout, 7) == ref[6:]


def test_entry_probabilities_are_seeded_weights():
    layout = layout_of([4, 4], entries=[("often", 0.8, [0]), ("rare", 0.2, [1])])
    a, b = DataOrder(8, 1, 0, 1, seed=3), DataOrder(8, 1, 0, 1, seed=3)
    picks = ["often" if a.next_items(layout)[0][0] < 4 else "rare" for _ in range(4000)]
    assert abs(picks.count("often") / 4000 - 0.8) < 0.03
    assert ["often" if b.next_items(layout)[0][0] < 4 else "rare" for _ in range(200)] == picks[:200]
    other = DataOrder(8, 1, 0, 1, seed=4)
    assert ["often" if other.next_items(layout)[0][0] < 4 else "rare" for _ in range(200)] != picks[:200]


@pytest.mark.parametrize("sampling, big_share", [("auto-weighting", 0.75), ("uniform", 0.5)])
def test_entries_are_weighted_by_size_as_simpletuner_does(sampling, big_share):
    """SimpleTuner's default (data_backend_sampling auto-weighting) weights an entry by probability x its size, so
    that its multidatabackend.json gives the same mix here; "uniform" by probability alone."""
    layout = layout_of([30, 10], entries=[("big", 1.0, [0]), ("small", 1.0, [1])])
    order = DataOrder(40, 1, 0, 1, seed=3, sampling=sampling)
    picks = [order.next_items(layout)[0][0] < 30 for _ in range(4000)]
    assert abs(sum(picks) / 4000 - big_share) < 0.03


@pytest.mark.parametrize("legacy", [False, True])
def test_a_peek_is_the_next_draw_and_moves_nothing(legacy):
    """`peek_items` (the reader's look-ahead) returns what `next_items` draws next, across entries, buckets, epochs
    and caption variants, and leaves the state alone: the draws and every checkpointed state match an order never
    peeked at (also one resumed from a pre-bucket checkpoint, whose position applies at the first draw)."""
    layout = layout_of([5, 3, 6], entries=[("a", 2.0, [0, 1]), ("b", 1.0, [2])], variants=[1, 2, 3] * 4 + [2, 1])
    if legacy:
        layout = Layout([Stream("e|32x32", list(range(7)))], [("e", 1.0, [0])], [1] * 7)
    plain, peeked = DataOrder(14, 2, 1, 2, seed=4), DataOrder(14, 2, 1, 2, seed=4)
    if legacy:
        plain.load_state_dict({"consumed": 12})
        peeked.load_state_dict({"consumed": 12})
    for _ in range(25):
        ahead = peeked.peek_items(layout)
        assert peeked.peek_items(layout) == ahead and peeked.state_dict() == plain.state_dict()
        assert peeked.next_items(layout) == ahead == plain.next_items(layout)
    assert peeked.peek_items() == plain.next_items()  # no layout: the plain order of n items


def test_every_seed_the_config_takes_draws():
    """Seeds up to 2**64 - 1 (the config's range): the first stream's permutation seed wraps into torch's unsigned
    64-bit range (it overflowed at the first draw, after the whole load), and different seeds still shuffle apart."""
    from fewstep.config import SEED_MAX

    orders = {seed: DataOrder(50, 5, 0, 1, seed=seed) for seed in (SEED_MAX, 7)}
    draws = {seed: [order.next_indices() for _ in range(3)] for seed, order in orders.items()}
    assert draws[SEED_MAX] != draws[7] and all(len(set(d)) == 5 for d in draws[SEED_MAX])


def test_caption_variants_are_drawn_per_use_and_reproducible():
    layout = layout_of([1], variants=[3])
    draws = [DataOrder(1, 1, 0, 1, seed=0).next_items(layout)]
    order = DataOrder(1, 1, 0, 1, seed=0)
    variants = [order.next_items(layout)[0][1] for _ in range(60)]
    assert set(variants) == {0, 1, 2} and variants[0] == draws[0][0][1]


def test_one_bucket_is_the_order_fewstep_had_before_buckets():
    """Same positions and permutations as the pre-bucket DataOrder (its test: epochs are permutations)."""
    plain = [DataOrder(7, 2, r, 2, seed=3) for r in range(2)]
    layout = Layout([Stream("e|32x32", list(range(7)))], [("e", 1.0, [0])], [1] * 7)
    bucketed = [DataOrder(7, 2, r, 2, seed=3) for r in range(2)]
    assert [[o.next_indices() for o in plain] for _ in range(9)] == \
           [[o.next_indices(layout) for o in bucketed] for _ in range(9)]
    assert bucketed[0].state_dict()["consumed"] == 9 * 4


def test_checkpoint_from_before_buckets_resumes_exactly():
    layout = Layout([Stream("e|32x32", list(range(7)))], [("e", 1.0, [0])], [1] * 7)
    ref = DataOrder(7, 2, 1, 2, seed=3)
    expected = [ref.next_indices(layout) for _ in range(8)][5:]
    old = DataOrder(7, 2, 1, 2, seed=3)
    old.load_state_dict({"consumed": 5 * 4})  # what fewstep saved before buckets
    saved_before_a_draw = DataOrder(7, 2, 1, 2, seed=3)  # a checkpoint at once (a resume at the end) keeps the place
    saved_before_a_draw.load_state_dict(old.state_dict())
    assert [old.next_indices(layout) for _ in range(3)] == expected
    assert [saved_before_a_draw.next_indices(layout) for _ in range(3)] == expected
    multi = DataOrder(7, 2, 1, 2, seed=3)
    multi.load_state_dict({"consumed": 20})
    with pytest.raises(DataError, match="saved before fewstep had buckets"):
        multi.next_items(layout_of([4, 3]))


def test_build_layout_groups_by_entry_and_bucket_with_repeats(tmp_path):
    entries = [ImageEntry(id="a", image_dir=".", resolution=32.0, repeats=1),
               ImageEntry(id="b", image_dir=".", resolution=64.0, probability=0.5, shuffle=False)]
    plan = lambda w, h: Plan((w, h), (w, h))  # noqa: E731
    samples = [Sample("1.png", "x", entry=0, plan=plan(32, 32)), Sample("2.png", "y", ["y", "z"], 0, plan(40, 28)),
               Sample("3.png", "x", entry=0, plan=plan(32, 32)), Sample("4.png", "w", entry=1, plan=plan(64, 64))]
    layout = build_layout(sample_table(tmp_path, samples), entries)
    assert [(s.key, s.items.tolist(), s.shuffle, s.size) for s in layout.streams] == [
        ("a|32x32", [0, 2], True, 4), ("a|40x28", [1], True, 2), ("b|64x64", [3], False, 1)]  # size: with repeats
    assert layout.entries == [("a", 1.0, [0, 1]), ("b", 0.5, [2])] and layout.variants.tolist() == [1, 2, 1, 1]


def test_streams_and_caption_counts_are_numpy_arrays():
    """A list of Python ints costs about 36 bytes an item: at 10 million images, 8 ranks a node, gigabytes."""
    layout = Layout([Stream("s", [3, 1, 2])], [("s", 1.0, [0])], [1, 2, 1, 300])
    assert layout.streams[0].items.dtype == np.int64 and layout.variants.itemsize <= 2
    assert Layout.single(4).streams[0].items.tolist() == [0, 1, 2, 3]
    picks = DataOrder(4, 3, 0, 1, seed=0).next_items(layout)
    assert all(type(i) is int and type(v) is int for i, v in picks)


def test_an_order_holds_two_permutations_of_a_stream_whatever_the_epochs():
    """Each rank keeps a stream's permutations of its two latest epochs (a micro-batch of a stream smaller than the
    global batch spans epochs), 4 bytes an item (int32): not lists of Python ints, nor one more permutation per
    epoch."""
    n = 1_000_000
    layout, order = Layout.single(n), DataOrder(n, 4, 0, 1, seed=0)

    def held_after(epochs):  # micro-batches at the end of epoch e - 1 (which start epoch e: module doc)
        for e in epochs:
            order.load_state_dict({"slot": e, "entries": {"all": e}, "positions": {"all": e * n - 2}})
            order.next_items(layout)
        return tracemalloc.get_traced_memory()[0] - base

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        first, later = held_after(range(1, 3)), held_after(range(3, 9))
    finally:
        tracemalloc.stop()
    assert 2 * 4 * n <= first <= 2 * 4 * n + 2 ** 20, first  # two int32 permutations, seen by tracemalloc
    assert later <= first + 2 ** 20, (first, later)


def test_small_buckets_cycling_through_epochs_keep_a_big_streams_permutation(monkeypatch):
    """A one-image bucket goes through an epoch per sample; the big stream's permutation is still made once."""
    layout = layout_of([5000, 1], entries=[("big", 1.0, [0]), ("tiny", 1.0, [1])])
    order, made, randperm = DataOrder(5001, 4, 0, 1, seed=0, sampling="uniform"), [], torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: made.append(n) or randperm(n, **kw))
    for _ in range(200):  # about 400 epochs of the tiny bucket, within the big one's first
        order.next_items(layout)
    assert made.count(5000) == 1


@pytest.mark.parametrize("n, batch, world", [(10, 2, 4), (9, 1, 8), (13, 3, 2), (1000, 8, 8)])
def test_a_global_batch_never_holds_an_item_twice(n, batch, world):
    """A bucket of at least a global batch whose size is not a multiple of it: the global batch across an epoch's
    end gave two ranks one image. Each epoch (whole global batches, module doc) still shows every item."""
    gb = batch * world
    per_epoch = -(-n // gb)  # global batches per epoch
    orders = [DataOrder(n, batch, r, world, seed=0) for r in range(world)]
    steps = [[i for rank in step for i in rank] for step in
             ([o.next_indices(layout_of([n])) for o in orders] for _ in range(6 * per_epoch))]
    assert all(len(set(step)) == gb for step in steps)
    for e in range(6):
        assert {i for step in steps[e * per_epoch:(e + 1) * per_epoch] for i in step} == set(range(n))


def test_resumed_with_another_world_size_a_batch_still_holds_each_item_once():
    """Positions advance by the global batch, so a batch fits in its epoch; resumed with another global batch, one
    that would not starts the next epoch. Resume on one world size stays exact."""
    layout, n = layout_of([11]), 11
    first = [DataOrder(n, 2, r, 3, seed=4) for r in range(3)]  # global batch 6
    draw(first, layout, 5)
    state = first[0].state_dict()
    resumed = [DataOrder(n, 2, r, 4, seed=4) for r in range(4)]  # global batch 8
    again = [DataOrder(n, 2, r, 4, seed=4) for r in range(4)]
    for o, p in zip(resumed + again, [state] * 8):
        o.load_state_dict(p)
    steps = draw(resumed, layout, 40)
    assert all(len({i for rank in step for i, _ in rank}) == 8 for step in steps)
    assert draw(again, layout, 40) == steps


def test_repeats_weigh_the_entry_and_bring_each_image_r_plus_1_times_a_round(tmp_path):
    """`repeats: 2`: the entry weighs 3 times its images, and a round of its data (3 passes) shows each image 3
    times, from a stream that lists each image once."""
    entries = [ImageEntry(id="a", image_dir=".", resolution=32.0, repeats=2),
               ImageEntry(id="b", image_dir=".", resolution=32.0)]
    plan = lambda w, h: Plan((w, h), (w, h))  # noqa: E731
    samples = [Sample(f"{i}.png", "x", entry=0, plan=plan(32, 32) if i < 4 else plan(48, 32)) for i in range(6)]
    samples += [Sample(f"b{i}.png", "y", entry=1, plan=plan(32, 32)) for i in range(18)]
    layout = build_layout(sample_table(tmp_path, samples), entries)
    assert [len(s.items) for s in layout.streams] == [4, 2, 18]
    order = DataOrder(len(samples), 2, 0, 1, seed=0)
    picks = [order.next_items(layout) for _ in range(4000)]
    assert abs(sum(p[0][0] < 6 for p in picks) / 4000 - 0.5) < 0.03  # 6 x 3 against 18 x 1
    a_only = Layout(layout.streams[:2], [("a", 1.0, [0, 1])], layout.variants)
    order = DataOrder(len(samples), 2, 0, 1, seed=0)
    for _ in range(3):  # rounds of (4 + 2) x 3 / 2 = 9 batches
        assert Counter(i for _ in range(9) for i, _ in order.next_items(a_only)) == {i: 3 for i in range(6)}


def test_each_epoch_is_a_new_permutation_of_every_stream():
    """Consecutive epochs of a stream (the first, and a later one) are different permutations (module doc, step 3)."""
    plain = DataOrder(8, 8, 0, 1, seed=3)
    first, second = plain.next_indices(), plain.next_indices()  # one global batch is one epoch
    assert sorted(first) == sorted(second) == list(range(8)) and first != second
    layout = Layout([Stream("x", [0]), Stream("y", list(range(1, 9)))], [("y", 1.0, [1])])
    later = DataOrder(9, 8, 0, 1, seed=3)
    first, second = later.next_indices(layout), later.next_indices(layout)
    assert sorted(first) == sorted(second) == list(range(1, 9)) and first != second


def test_equal_size_streams_are_shuffled_apart():
    """Two buckets of one size in one layout each get their own permutation."""
    layout = Layout([Stream("x", [0]), Stream("p", list(range(1, 9))), Stream("q", list(range(9, 17)))],
                    [("a", 1.0, [1, 2])])
    order = DataOrder(17, 8, 0, 1, seed=3)
    batches = sorted(order.next_indices(layout) for _ in range(2))  # a round: one batch of each bucket
    assert [i - 1 for i in batches[0]] != [i - 9 for i in batches[1]]


def test_the_seed_shuffles_the_bucket_order_of_a_round():
    """Two seeds give different bucket sequences over a round (its shuffle is seeded by the seed too)."""
    layout = layout_of([2] * 6)  # a round: one batch of each bucket

    def buckets(seed):
        order = DataOrder(12, 2, 0, 1, seed=seed)
        return [stream_of(layout, order.next_items(layout)[0][0]) for _ in range(6)]
    assert sorted(buckets(0)) == sorted(buckets(1)) == list(range(6)) and buckets(0) != buckets(1)


def test_unshuffled_streams_keep_their_bucket_order():
    """Streams with shuffle false: each round lists its buckets in order, whatever the seed: [s0, s0, s1]."""
    layout = Layout([Stream("s0", [0, 1, 2, 3], shuffle=False), Stream("s1", [4, 5], shuffle=False)],
                    [("e", 1.0, [0, 1])])
    for seed in (0, 1, 2):
        order = DataOrder(6, 2, 0, 1, seed=seed)
        assert [order.next_indices(layout) for _ in range(12)] == [[0, 1], [2, 3], [4, 5]] * 4


def test_an_unshuffled_stream_is_in_file_order():
    """A stream with shuffle false gives its items in file order."""
    layout = Layout([Stream("s", list(range(6)), shuffle=False)], [("s", 1.0, [0])])
    order = DataOrder(6, 2, 0, 1, seed=5)
    assert [order.next_indices(layout) for _ in range(3)] == [[0, 1], [2, 3], [4, 5]]


def test_a_plain_dataset_without_shuffle_is_in_file_order():
    """No layout and shuffle=False: the n items in order."""
    order = DataOrder(8, 2, 0, 1, 0, shuffle=False)
    assert [order.next_indices() for _ in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_a_stream_smaller_than_the_global_batch_advances_by_the_global_batch():
    """n = 3 < G = 4: epochs of n positions, no jump to an epoch boundary; positions advance by G."""
    layout = Layout([Stream("s", [0, 1, 2])], [("s", 1.0, [0])])
    order = DataOrder(3, 4, 0, 1, seed=0)
    for _ in range(3):
        order.next_indices(layout)
    assert order.state_dict()["positions"] == {"s": 12}


def test_caption_variants_depend_on_the_seed_and_the_position():
    """Variant sequences differ between seeds, and the samples of one batch draw their variants apart."""
    one = layout_of([1], variants=[5])
    orders = [DataOrder(1, 1, 0, 1, seed=s) for s in (0, 1)]
    seqs = [[o.next_items(one)[0][1] for _ in range(30)] for o in orders]
    assert seqs[0] != seqs[1]
    batch = DataOrder(16, 16, 0, 1, seed=0).next_items(layout_of([16], variants=[4] * 16))
    assert len({v for _, v in batch}) > 1


def test_a_pre_bucket_checkpoint_resumes_at_its_global_batch_slot():
    """`consumed` 20 at world 2, batch 2 is slot 5; one draw later: consumed 24, slot 6, the entry at 6."""
    layout = Layout([Stream("e|32x32", list(range(7)))], [("e", 1.0, [0])], [1] * 7)
    order = DataOrder(7, 2, 0, 2, seed=3)
    order.load_state_dict({"consumed": 20})
    order.next_items(layout)
    state = order.state_dict()
    assert (state["consumed"], state["slot"], state["entries"]) == (24, 6, {"e": 6})
    assert state["positions"] == {"e|32x32": 24}


def test_caption_counts_above_255_are_kept():
    """A dataset index with 300 captions keeps the count 300."""
    assert Layout([Stream("s", [0])], [("s", 1.0, [0])], [300]).variants.tolist() == [300]
