"""The vectorised micro-batch read (ShardStream.load → CacheReader.read_many → collate) gives back what the
writer was handed, sequence by sequence in the asked order, on both stores: ids and counts exactly, values
within the codec's documented bound (checked per position against a plain Python loop over the records)."""

from __future__ import annotations


import numpy as np
import pytest

from cache.codec import Codec, max_logprob_error
from cache.reader import CacheReader
from cache.schema import ragged_arange, sequences_from_flat
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
            "draw_logprobs": -3 * rng.random(int(draw_n.sum())).astype(np.float32),
            "router_ids": np.stack([rng.permutation(EXPERTS)[:R] for _ in range(t * LAYERS)]).reshape(t, LAYERS, R),
            "router_probs": np.sort(rng.dirichlet(np.ones(EXPERTS), (t, LAYERS))[..., :R], -1)[..., ::-1].astype(np.float32)}


def distinct_draws(rec: dict, rng: np.random.Generator) -> dict:
    """Draw ids unique within each position, as a teacher's are."""
    n = rec["draw_n"]
    rec["draw_ids"] = np.concatenate([rng.permutation(1000)[:m] for m in n] or [[]]).astype(np.int32)
    return rec


PRESETS = ["compact", "balanced", "exact"]


@pytest.fixture(params=[("zarr", "balanced"), ("hdf5", "compact"), ("zarr", "exact")], ids=lambda p: "-".join(p))
def cache(tmp_path, request):
    store, preset = request.param
    rng = np.random.default_rng(0)
    records = [distinct_draws(record(rng, first, rng.integers(1, 40, 5).tolist()), rng) for first in range(0, 40, 5)]
    codec = Codec.for_preset(preset, 1000, list(range(999, -1, -3)))
    identity = {"codec": codec.to_dict(), "k": K, "temperatures": [1.0, 2.0]}
    with CacheWriter(tmp_path, rank=0, identity=identity, store=store, codec=codec, shard_tokens=120,
                     chunk_tokens=8, compression="gzip", level=1, num_experts=EXPERTS) as writer:
        for rec in records:
            writer.add(sequences_from_flat({k: v.copy() for k, v in rec.items()}, (1.0, 2.0)))
    finalize(tmp_path, identity, store, list(records[0]))
    by_id = {}
    for rec in records:  # per sequence, in plain Python: the reference
        starts, d_starts = np.cumsum(rec["seq_lens"]) - rec["seq_lens"], np.cumsum(rec["draw_n"]) - rec["draw_n"]
        for j, sid in enumerate(rec["sample_ids"].tolist()):
            a, n = int(starts[j]), int(rec["seq_lens"][j])
            seq = {k: rec[k][a:a + n] for k in ("input_ids", "loss_mask", "target_logprob", "log_partition",
                                                 "topk_ids", "topk_logprobs", "draw_n", "router_ids", "router_probs")}
            seq["draws"] = [{int(i): (int(c), float(lp)) for i, c, lp in zip(
                rec["draw_ids"][d:d + m], rec["draw_counts"][d:d + m], rec["draw_logprobs"][d:d + m])}
                for d, m in zip(d_starts[a:a + n].tolist(), rec["draw_n"][a:a + n].tolist())]
            by_id[sid] = seq
    return tmp_path, by_id, codec


def check_sequence(seqs, t: int, want: dict, codec: Codec) -> int:
    """Positions [t, t + n) of a decoded record against one reference sequence."""
    n, bound = len(want["input_ids"]), max_logprob_error(codec.logprob_bits) + 1e-6
    got = seqs.teacher
    np.testing.assert_array_equal(seqs.input_ids[t:t + n], want["input_ids"])
    np.testing.assert_array_equal(seqs.loss_mask[t:t + n], want["loss_mask"])
    np.testing.assert_allclose(got.target_logprob[t:t + n], want["target_logprob"], atol=2.0**-11 + 1e-6)
    np.testing.assert_allclose(got.log_partition[t:t + n, 1:], want["log_partition"][:, 1:], rtol=0, atol=0)
    for i in range(n):
        head = dict(zip(got.topk_ids[t + i].tolist(), got.topk_logprobs[t + i].tolist()))
        assert sorted(head) == sorted(want["topk_ids"][i].tolist())
        assert all(abs(head[v] - lp) <= bound for v, lp in zip(want["topk_ids"][i].tolist(), want["topk_logprobs"][i]))
        assert (np.diff(got.topk_logprobs[t + i]) <= 0).all(), "head by descending probability"
        drawn = got.draw_counts[t + i] > 0
        m = int(drawn.sum())
        assert not drawn[m:].any(), "padding after the draws"
        draws = {int(v): (int(c), float(lp)) for v, c, lp in zip(got.draw_ids[t + i][drawn], got.draw_counts[t + i][drawn],
                                                                  got.draw_logprobs[t + i][drawn])}
        assert sorted(draws) == sorted(want["draws"][i]) and m == want["draw_n"][i]
        assert all(draws[v][0] == c and abs(draws[v][1] - lp) <= bound for v, (c, lp) in want["draws"][i].items())
        for layer in range(LAYERS):
            ids, probs = got.router_ids[t + i, layer], got.router_probs[t + i, layer]
            np.testing.assert_array_equal(np.sort(ids), np.sort(want["router_ids"][i, layer]))
            router_bound = (0 if codec.router_bits == 32 else 16 / 2**codec.router_bits / 2) + 1e-6
            want_p = dict(zip(want["router_ids"][i, layer].tolist(), want["router_probs"][i, layer].tolist()))
            assert all(abs(np.log(p) - np.log(want_p[e])) <= router_bound for e, p in zip(ids.tolist(), probs))
    return t + n


def test_load_and_collate_give_back_the_records(cache):
    cache_dir, by_id, codec = cache
    stream = ShardStream(CacheSource(cache_dir), StreamPlan(batch_size=7, shuffle_window=64, seed=3))
    assert len(set(stream.index.shard.tolist())) > 2  # micro-batches span shards
    order = stream.order(0)
    for seqs in [order[i:i + 7] for i in range(0, len(order), 7)] + [order[::-1], order[:1]]:
        got = stream.load(seqs)
        assert got.sample_ids.tolist() == stream.index.sample_ids[seqs].tolist()
        t = 0
        for sid in got.sample_ids.tolist():
            t = check_sequence(got, t, by_id[sid], codec)
        assert t == len(got.input_ids)
        assert got.teacher.temperatures == (1.0, 2.0) and got.teacher.draw_logprobs.dtype == np.float32
        batch = collate(got)
        assert batch["input_ids"].shape[0] == len(seqs) and int(batch["valid"].sum()) == t


def test_a_block_cache_smaller_than_one_read_still_reads_right(cache):
    """A whole-vocabulary top-k makes one gather's chunks outgrow the block cache: the chunks a read
    needs are used before they are evicted (the demo's k = V cache once failed with a KeyError)."""
    cache_dir, by_id, codec = cache
    tiny = CacheReader(cache_dir, block_cache_bytes=64)  # below one chunk of any array: nothing stays cached
    for info in tiny.shards:
        seqs = np.arange(len(tiny.seq_offsets(info.name)) - 1)[::-1]
        got = tiny.read_many(info.name, seqs)
        t = 0
        for sid in got.sample_ids.tolist():
            t = check_sequence(got, t, by_id[sid], codec)


def test_ragged_arange_equals_concatenated_aranges():
    rng = np.random.default_rng(1)
    starts = rng.integers(0, 50, 30)
    ends = starts + rng.integers(0, 4, 30)  # empty ranges included
    want = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
    np.testing.assert_array_equal(ragged_arange(starts, ends), want)
    assert len(ragged_arange(np.array([3]), np.array([3]))) == 0
