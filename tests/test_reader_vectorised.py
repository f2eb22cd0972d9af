"""The vectorised micro-batch read (ShardStream.load → CacheReader.read_many) equals the per-sequence
path it replaced (one ``CacheReader.read`` per sequence, concatenated), exactly, on both stores."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cache.codec import Codec
from cache.schema import Sequences, concat_sequences, ragged_arange, sequences_from_flat
from cache.stream import CacheSource, ShardStream, StreamPlan
from cache.writer import CacheWriter, finalize
from pipeline.batches import collate

K, LAYERS, R, EXPERTS = 6, 3, 2, 16


def record(rng: np.random.Generator, first_id: int, lens: list[int]) -> dict:
    """Ragged sequences, masked positions, 0..5 draws per position (0 included), router ids and probs."""
    t = int(sum(lens))
    draw_n = rng.integers(0, 6, t)
    return {"sample_ids": np.arange(first_id, first_id + len(lens), dtype=np.int64), "seq_lens": np.array(lens),
            "input_ids": rng.integers(0, 1000, t), "loss_mask": (rng.random(t) < 0.6).astype(np.uint8),
            "target_logprob": -rng.random(t).astype(np.float32), "log_partition": rng.random((t, 2), np.float32),
            "topk_ids": np.stack([rng.permutation(1000)[:K] for _ in range(t)]).astype(np.int32),
            "topk_logprobs": np.sort(-rng.random((t, K)).astype(np.float32), axis=1)[:, ::-1].copy(),
            "draw_n": draw_n, "draw_ids": rng.integers(0, 1000, int(draw_n.sum())).astype(np.int32),
            "draw_counts": rng.integers(1, 9, int(draw_n.sum())).astype(np.int32),
            "router_ids": rng.integers(0, EXPERTS, (t, LAYERS, R)).astype(np.uint8),
            "router_probs": rng.random((t, LAYERS, R)).astype(np.float32)}


@pytest.fixture(params=["zarr", "hdf5"])
def cache_dir(tmp_path, request):
    identity = {"codec": {"ids": "sorted_delta", "values": "float16"}, "k": K}
    rng = np.random.default_rng(0)
    with CacheWriter(tmp_path, rank=0, identity=identity, store=request.param, codec=Codec(), shard_tokens=120,
                     chunk_rows=8, compression="gzip", level=1, num_experts=EXPERTS) as writer:
        for first in range(0, 40, 5):
            writer.add(sequences_from_flat(record(rng, first, rng.integers(1, 40, 5).tolist()), (1.0, 2.0)))
    finalize(tmp_path, identity, request.param, list(record(rng, 0, [1])))
    return tmp_path


def per_sequence(stream: ShardStream, seqs: np.ndarray) -> Sequences:
    """The old path: one read per sequence, every field concatenated."""
    idx, reader, names = stream.index, stream.source.reader, stream.source.names
    return concat_sequences([reader.read(names[int(idx.shard[i])], int(idx.local[i]), int(idx.local[i]) + 1)
                             for i in seqs])


def assert_equal_tree(got, want, path="") -> None:
    if dataclasses.is_dataclass(want):
        assert type(got) is type(want), path
        assert_equal_tree(got.__dict__, want.__dict__, path)
    elif isinstance(want, dict):
        assert sorted(got) == sorted(want), path
        for key in want:
            assert_equal_tree(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, tuple):
        assert got == want, path
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), path
    else:
        np.testing.assert_array_equal(got, want, err_msg=path)
        assert np.asarray(got).dtype == np.asarray(want).dtype, path


def test_load_and_collate_equal_the_per_sequence_path(cache_dir):
    stream = ShardStream(CacheSource(cache_dir), StreamPlan(batch_size=7, shuffle_window=64, seed=3))
    assert len(set(stream.index.shard.tolist())) > 2  # micro-batches span shards
    order = stream.order(0)
    for seqs in [order[i:i + 7] for i in range(0, len(order), 7)] + [order[::-1], order[:1]]:
        got, want = stream.load(seqs), per_sequence(stream, seqs)
        assert_equal_tree(got.__dict__, want.__dict__)
        assert_equal_tree(collate(got), collate(want))


def test_ragged_arange_equals_concatenated_aranges():
    rng = np.random.default_rng(1)
    starts = rng.integers(0, 50, 30)
    ends = starts + rng.integers(0, 4, 30)  # empty ranges included
    want = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
    np.testing.assert_array_equal(ragged_arange(starts, ends), want)
    assert len(ragged_arange(np.array([3]), np.array([3]))) == 0


def test_descending_order_equals_the_float_argsort():
    """The int16-key sort of float16 log-probs equals the stable argsort of -log-probs: ties, ±0, the
    clamp value, a NaN row (which takes the float path)."""
    from cache.codec import MIN_LOGPROB, descending_order

    rng = np.random.default_rng(2)
    lp = (-rng.exponential(2.0, (500, 16))).astype(np.float16)
    lp[:, :4] = lp[:, 4:8]  # ties
    lp[0, :3] = [0.0, -0.0, 0.0]
    lp[1, :3] = MIN_LOGPROB
    for stored in (lp, np.where(np.arange(500)[:, None] == 7, np.float16(np.nan), lp)):
        want = np.argsort(-stored.astype(np.float32), axis=1, kind="stable")
        np.testing.assert_array_equal(descending_order(stored, stored.astype(np.float32)), want)
