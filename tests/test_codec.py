"""The v2 codecs (cache/codec.py) against float64 references: the documented error bounds hold, ids and
counts come back exactly, frequent ids cost fewer bytes, the presets and bad names are one line."""

from __future__ import annotations

import numpy as np
import pytest
from numcodecs import Shuffle, Zstd

from cache.codec import (LOGPROB_STEP, MIN_LOGPROB, PRESETS, Codec, check_preset, decode_draw_ids, decode_head,
                         decode_router, dequantise, encode_draws, encode_head, encode_router, frequency_order,
                         max_logprob_error, prefix_sums, quantise)

V = 5000


def descending_head(rng, t: int, k: int, vocab: int = V) -> tuple[np.ndarray, np.ndarray]:
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(t)]).astype(np.int32)
    lp = -np.cumsum(rng.random((t, k)) + 0.2, axis=1).astype(np.float32)  # gaps > one 8-bit step: no ties
    return ids, lp


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_quantiser_error_is_within_the_documented_bound(bits):
    lp = -np.random.default_rng(0).exponential(3.0, 100_000)
    floor = -(((1 << bits) - 1) * LOGPROB_STEP[bits]) if bits != 32 else MIN_LOGPROB
    inside = lp >= floor
    err = np.abs(dequantise(quantise(lp, bits), bits).astype(np.float64) - lp)
    bound = max_logprob_error(bits)
    assert (err[inside] <= bound + 2.0**-23 * np.abs(lp[inside])).all()  # + the float32 rounding of the input
    if bits != 32:
        assert err[inside].max() > 0.9 * bound  # the bound is tight, not a loose promise
        np.testing.assert_allclose(dequantise(quantise(lp[~inside], bits), bits), floor, rtol=1e-6)
    assert np.isfinite(dequantise(quantise(np.array([-np.inf, 0.0]), bits), bits)).all()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_head_round_trip_by_descending_probability(preset):
    rng = np.random.default_rng(1)
    ids, lp = descending_head(rng, 200, 8)
    codec = Codec.for_preset(preset, V, frequency_order(rng.integers(0, V, 3000), V))
    stored_ids, stored_lp = encode_head(ids, lp, codec)
    assert stored_ids.dtype == np.int32 and (stored_ids[:, 1:] > 0).all(), "ranks ascending: positive deltas"
    got_ids, got_lp = decode_head(stored_ids, stored_lp, codec)
    np.testing.assert_array_equal(got_ids, ids)
    assert np.abs(got_lp.astype(np.float64) - lp).max() <= max_logprob_error(codec.logprob_bits) + 1e-6
    assert got_ids.dtype == np.int64 and got_lp.dtype == np.float32


def test_head_ties_come_back_by_ascending_rank_whatever_the_input_order():
    codec = Codec.for_preset("compact", 100, [40, 30, 20, 10, 5])
    lp = np.array([[-0.5, -1.0, -1.0, -1.0, -2.0]], dtype=np.float32)
    outs = [decode_head(*encode_head(np.array([perm], np.int32), lp, codec), codec)[0][0].tolist()
            for perm in ([40, 30, 10, 20, 5], [40, 20, 30, 10, 5], [40, 10, 20, 30, 5])]
    assert outs == [[40, 30, 20, 10, 5]] * 3  # ties by rank: 30 (rank 1), 20 (rank 2), 10 (rank 3)


def test_draws_round_trip_exactly_with_empty_positions():
    rng = np.random.default_rng(2)
    n = rng.integers(0, 7, 300)
    ids = np.concatenate([rng.choice(V, m, replace=False) for m in n]).astype(np.int32)
    counts, lp = rng.integers(1, 300, len(ids)), -rng.exponential(2.0, len(ids))
    codec = Codec.for_preset("balanced", V, frequency_order(rng.integers(0, V, 10_000), V))
    stored = encode_draws(n, ids, counts, lp, codec)
    assert stored["draw_counts"].dtype == np.uint16 and stored["draw_n"].dtype == np.uint16  # counts past 255
    got = decode_draw_ids(stored["draw_n"], stored["draw_ids"], codec)
    starts = np.cumsum(n) - n
    for a, m in zip(starts, n):  # per position: the same (id → count, log-prob) map
        want = {int(i): (int(c), float(x)) for i, c, x in zip(ids[a:a + m], counts[a:a + m], lp[a:a + m])}
        back = dict(zip(got[a:a + m].tolist(), zip(stored["draw_counts"][a:a + m].tolist(),
                                                   dequantise(stored["draw_logprobs"][a:a + m], 16).tolist())))
        assert sorted(back) == sorted(want)
        assert all(back[i][0] == c and abs(back[i][1] - x) <= 2.0**-11 + 1e-6 for i, (c, x) in want.items())
    assert len(decode_draw_ids(np.zeros(4, np.uint8), np.zeros(0, np.int32), codec)) == 0


def compressed(a: np.ndarray) -> int:
    a = np.ascontiguousarray(a)
    raw = Shuffle(a.dtype.itemsize).encode(a.tobytes()) if a.dtype.itemsize > 1 else a.tobytes()
    return len(Zstd(3).encode(raw))


def test_frequency_remap_makes_frequent_ids_cheaper():
    """Zipf-distributed draws over a shuffled vocabulary: coded by frequency rank they take fewer bytes
    than coded by id (the remap is learned from the same kind of data, not handed the answer)."""
    rng = np.random.default_rng(3)
    vocab = 50_000
    perm = rng.permutation(vocab)
    zipf = 1 / (np.arange(vocab) + 2.7)
    text = perm[rng.choice(vocab, 200_000, p=zipf / zipf.sum())]
    groups = [np.unique(perm[rng.choice(vocab, 8, p=zipf / zipf.sum())]) for _ in range(4000)]
    n, ids = np.array([len(g) for g in groups]), np.concatenate(groups)
    ones = np.ones(len(ids), np.int32)
    ranked = encode_draws(n, ids, ones, -ones.astype(float), Codec.for_preset("compact", vocab, frequency_order(text, vocab)))
    plain = encode_draws(n, ids, ones, -ones.astype(float), Codec.for_preset("compact"))
    assert compressed(ranked["draw_ids"]) < 0.8 * compressed(plain["draw_ids"])


@pytest.mark.parametrize("bits", [7, 8, 32])
def test_router_round_trip(bits):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(50, 3, 64))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ids = np.argsort(-probs, axis=-1, kind="stable")[..., :8]
    top = np.take_along_axis(probs, ids, -1)
    codec = Codec("compact", 8, bits)
    stored_ids, stored_probs = encode_router(ids, top.astype(np.float32), codec, 64)
    assert stored_ids.dtype == np.uint8 and (stored_probs.dtype == np.uint8 or bits == 32)
    got_ids, got_probs = decode_router(stored_ids, stored_probs, codec)
    bound = 0 if bits == 32 else LOGPROB_STEP[bits] / 2
    for t, layer in np.ndindex(50, 3):  # the same experts with their probabilities, by ascending expert id
        want = dict(zip(ids[t, layer].tolist(), top[t, layer].tolist()))
        assert sorted(got_ids[t, layer].tolist()) == sorted(want)
        assert all(abs(np.log(p) - np.log(want[e])) <= bound + 1e-6 for e, p in zip(got_ids[t, layer].tolist(),
                                                                                  got_probs[t, layer]))
        assert got_ids[t, layer].tolist() == sorted(want)
    ids_only, none = decode_router(*encode_router(ids, None, codec, 64), codec)
    assert none is None and (np.sort(ids, -1) == ids_only).all()


@pytest.mark.parametrize("shape, dtype", [((7, 3, 8), np.uint8), ((5, 2, 128), np.uint8), ((4, 300), np.int16), ((3, 1), np.uint8)])
def test_prefix_sums_equal_cumsum(shape, dtype):
    deltas = np.random.default_rng(0).integers(0, 2, shape).astype(dtype)
    kept = deltas.copy()
    got = prefix_sums(deltas)
    assert got.dtype == dtype and (got == np.cumsum(deltas, axis=-1)).all()
    assert (deltas == kept).all(), "the input is not modified"


def test_unknown_preset_and_bits_are_one_line():
    with pytest.raises(ValueError, match="cache.preset='tiny' is unknown; allowed: compact, balanced, exact"):
        check_preset("tiny")
    with pytest.raises(ValueError, match="allowed: 4, 5, 6, 7, 8, 16, 32"):
        Codec("compact", 12)
