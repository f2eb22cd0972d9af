"""Shard stream (issue 3): a plan that is a pure function of (seed, epoch), rank and token
budgets, DataLoader workers on both stores, and resume proven by replay (STYLE 12)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache.schema import CacheError, TeacherRecord
from cache.stream import CacheSource, SequenceIndex, ShardStream, StreamPlan
from pipeline.batches import PackedBatch, epoch_steps
from pipeline.run_paths import cache_dir

STORES = ("zarr", "hdf5")


@pytest.fixture
def source_of(cached_run):
    def make(store: str = "zarr") -> CacheSource:
        run_dir, _ = cached_run(f"cache.store={store}")
        return CacheSource(cache_dir(run_dir, "train"))

    return make


class Lengths:
    """A source with only an index: plan tests need no shard."""

    def __init__(self, lengths, shards: int = 3):
        self.lengths = np.asarray(lengths)
        self.shards = shards

    def index(self) -> SequenceIndex:
        n = len(self.lengths)
        shard = np.arange(n) * self.shards // n
        local = np.arange(n) - np.searchsorted(shard, shard)
        return SequenceIndex(np.arange(n) * 7 + 3, self.lengths, shard, local)


def assert_same_batch(a, b) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_batch(a[key], b[key])
        elif isinstance(a[key], TeacherRecord):
            assert (a[key].temperatures, a[key].draw_temperature) == (b[key].temperatures, b[key].draw_temperature)
            assert_same_batch(a[key].arrays(), b[key].arrays())
        elif a[key] is None:
            assert b[key] is None, key
        else:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_plan_is_a_function_of_seed_and_epoch():
    src = Lengths(np.random.default_rng(0).integers(5, 40, 101))
    plan = StreamPlan(seed=5, batch_size=4, shuffle_window=16, drop_last=False)
    a, b = ShardStream(src, plan), ShardStream(src, plan)
    np.testing.assert_array_equal(a.order(0), b.order(0))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), ShardStream(src, StreamPlan(seed=6, shuffle_window=16)).order(0))
    for epoch in (0, 1):
        steps = a.steps(epoch)
        assert [len(s) for s in steps] == [4] * 25 + [1]  # drop_last=False keeps the short step
        np.testing.assert_array_equal(np.sort(np.concatenate(steps)), np.arange(101))  # each sequence once


def test_drop_last_drops_only_the_short_step():
    src = Lengths(np.full(10, 8))
    steps = ShardStream(src, StreamPlan(batch_size=4, drop_last=True)).steps(0)
    assert [len(s) for s in steps] == [4, 4]


@pytest.mark.parametrize("world,micro", [(2, 1), (2, 2), (4, 1)])
def test_rank_split_partitions_each_step(world, micro):
    src = Lengths(np.random.default_rng(1).integers(5, 40, 64))
    plans = [StreamPlan(batch_size=8, micro_batches=micro, rank=r, world_size=world) for r in range(world)]
    streams = [ShardStream(src, p) for p in plans]
    for step in streams[0].steps(0):
        parts = [mb for s in streams for mb in s.rank_micro_batches(step)]
        assert all(len(mb) > 0 for mb in parts) and len(parts) == world * micro
        union = np.concatenate(parts)
        assert len(union) == len(step) and set(union.tolist()) == set(step.tolist())  # disjoint, complete


def test_token_budget_and_minimum_sequences():
    lengths = np.random.default_rng(2).integers(5, 60, 200)
    stream = ShardStream(Lengths(lengths), StreamPlan(batch_tokens=150, world_size=2, micro_batches=2,
                                                      drop_last=False))
    steps = stream.steps(0)
    np.testing.assert_array_equal(np.sort(np.concatenate(steps)), np.arange(200))
    for i, step in enumerate(steps):
        tokens = int(lengths[step].sum())
        assert len(step) >= 4 or i == len(steps) - 1  # one sequence per rank and micro-batch
        assert tokens <= 150 or len(step) == 4, (len(step), tokens)  # only the minimum may exceed it
        if i < len(steps) - 1 and len(step) > 4:  # full: the next sequence would not have fit
            assert tokens + lengths[steps[i + 1][0]] > 150
    dropped = ShardStream(Lengths(lengths), StreamPlan(batch_tokens=150, world_size=2, micro_batches=2)).steps(0)
    assert len(dropped) in (len(steps), len(steps) - 1) and all(lengths[s].sum() > 0 for s in dropped)


def consume(stream: ShardStream, n: int, workers: int = 0) -> list[tuple[np.ndarray, list[dict]]]:
    """n optimizer steps from the stream's position, advancing it like the trainer does."""
    out = []
    while len(out) < n:
        for seqs, micro in epoch_steps(stream, workers):
            stream.advance(seqs)
            out.append((seqs, micro))
            if len(out) == n:
                return out
        stream.next_epoch()
    return out


def test_state_dict_replay_matches_the_uninterrupted_stream(source_of):
    plan = StreamPlan(seed=3, batch_size=4, micro_batches=2, shuffle_window=8)
    reference = consume(ShardStream(source_of(), plan), 14)  # 11 steps per epoch: crosses an epoch
    first = ShardStream(source_of(), plan)
    consume(first, 9)
    state = first.state_dict()
    resumed = ShardStream(source_of(), plan)  # built from nothing
    resumed.load_state_dict(state)
    replay = consume(resumed, 5)
    for (seqs_a, micro_a), (seqs_b, micro_b) in zip(reference[9:], replay):
        np.testing.assert_array_equal(seqs_a, seqs_b)
        for a, b in zip(micro_a, micro_b):
            assert_same_batch(a, b)
    assert [s.tolist() for s, _ in reference[9:]] != [s.tolist() for s, _ in reference[:5]]


@pytest.mark.parametrize("store", STORES)
def test_workers_yield_the_same_batches_in_order(source_of, store):
    plan = StreamPlan(seed=1, batch_size=4, micro_batches=2, shuffle_window=8)
    serial = list(epoch_steps(ShardStream(source_of(store), plan), 0))
    parallel = list(epoch_steps(ShardStream(source_of(store), plan), 2))  # h5py opens lazily in each worker
    assert len(serial) == len(parallel) > 0
    for (seqs_a, micro_a), (seqs_b, micro_b) in zip(serial, parallel):
        np.testing.assert_array_equal(seqs_a, seqs_b)
        for a, b in zip(micro_a, micro_b):
            assert_same_batch(a, b)


def test_a_packed_micro_batch_unpacks_to_the_batch_it_was(source_of):
    """What a worker sends is one buffer; unpacked, it is the batch read: every tensor with its dtype and shape
    (an empty one too), the teacher's metadata, no teacher as None."""
    stream = ShardStream(source_of(), StreamPlan(seed=2, batch_size=4, shuffle_window=8))
    _, (mb,) = next(epoch_steps(stream, 0))
    mb["empty"] = torch.zeros(0, 3, dtype=torch.int16)
    unpacked = PackedBatch.of(mb).unpack()
    assert_same_batch(unpacked, mb)
    tensors = [v for v in unpacked.values() if torch.is_tensor(v)] + list(unpacked["teacher"].arrays().values())
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    assert PackedBatch.of({**mb, "teacher": None}).unpack()["teacher"] is None


def test_batches_hold_what_the_cache_holds(source_of):
    """Decoded batch == the reader's own decode of each sequence, in the planned order."""
    source = source_of()
    stream = ShardStream(source, StreamPlan(seed=2, batch_size=4, shuffle_window=8))
    seqs, (mb,) = next(epoch_steps(stream, 0))
    expected = [source.read(int(stream.index.shard[i]), int(stream.index.local[i])) for i in seqs]
    assert mb["sample_ids"].tolist() == [int(e.sample_ids[0]) for e in expected]
    np.testing.assert_array_equal(mb["input_ids"][mb["valid"]].numpy(), np.concatenate([e.input_ids for e in expected]))
    np.testing.assert_array_equal(mb["teacher"].topk_ids.numpy(), np.concatenate([e.teacher.topk_ids for e in expected]))


def test_refuses_a_state_of_another_cache_or_seed(source_of):
    plan = StreamPlan(seed=3, batch_size=4)
    state = ShardStream(source_of(), plan).state_dict()
    with pytest.raises(CacheError, match="another cache or seed"):
        ShardStream(source_of(), StreamPlan(seed=4, batch_size=4)).load_state_dict(state)
    other = ShardStream(source_of(), plan)
    other.index.sample_ids = other.index.sample_ids + 1000  # same count, other sequences
    with pytest.raises(CacheError, match="another cache or seed"):
        other.load_state_dict(state)
