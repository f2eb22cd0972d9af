"""Encode and decode the teacher's signal for storage (format v2): presets, quantisers, id coding.

Bytes at a real teacher's shape (vocab 151,936) go to ids and values, so:

- **ids** are coded by their rank in a frequency-ranked remap of the vocabulary (``Codec.vocab_order``:
  the ids of the cached split by descending count, recorded in the manifest; ids the split never holds
  follow in id order). Within a position the ranks are sorted ascending and stored as the first rank
  then deltas: frequent tokens and close ranks make small integers, which zstd/gzip shrink to a few bits.
- **log-probs** (top-k head, each draw's, the target's) are quantised uniformly in log space:
  ``q = round(-log p / step)``, ``log p ≈ -q·step``, with step = 16 / 2^bits nats for bits ≤ 8 (a range of
  16 nats) and 1/1024 for 16 bits (64 nats); |Δ log p| ≤ step/2 for log p ≥ -(2^bits - 1)·step, below it the
  value clamps to that floor (a probability under ~1.2e-7). 32 bits = float32, exact. Router probabilities
  use the same quantiser on log p (7 bits: |Δ log p| ≤ 1/16, 8 bits: ≤ 1/32, for p ≥ 1.2e-7).
- **router entries** are stored sorted by expert id (deltas, uint8) with their quantised probabilities in
  the same order, ~9.4 B per layer for the top-8 of 128 at 7 bits; decoded in that order, ids kept narrow.

Shapes: T positions, K head entries, D stored draw entries, L stored MoE layers, R router entries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np

BITS = (4, 5, 6, 7, 8, 16, 32)  # 32 = float32 (no quantisation)
LOGPROB_STEP = {**{b: 16 / 2**b for b in range(4, 9)}, 16: 1 / 1024}  # nats per quantisation step
MIN_LOGPROB = -1.0e4  # float32 log-probs are clamped here (-inf in a softmax is a probability of 0 anyway)


@dataclass(frozen=True)
class Preset:
    """What ``cache.preset`` sets: the shape of the signal (unless the cache keys set it) and its codec."""

    targets: str
    k: int  # exact top-k head entries
    num_draws: int  # draws per position (sampled targets)
    router_topk: str  # 'all', 'routed' (the teacher's experts per token) or an integer
    logprob_bits: int  # 8, 16 or 32 (float32)
    router_bits: int  # 4..8 or 32 (float32)
    meaning: str


PRESETS = {
    "compact": Preset("topk+sampled", 4, 48, "routed", 8, 7,
                      "48 draws (~13 unique ids) + a top-4 head, 8-bit log-probs, 7-bit router probabilities"),
    "balanced": Preset("topk", 64, 64, "all", 16, 8, "top-64 head, 16-bit log-probs (|Δ| ≤ 4.9e-4 nats)"),
    "exact": Preset("topk", 64, 64, "all", 32, 32, "top-64 head, float32 log-probs and router probabilities"),
}


def check_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"cache.preset={name!r} is unknown; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]


def max_logprob_error(bits: int) -> float:
    """The documented bound on |stored − exact| log-prob for values inside the quantiser's range."""
    return 0.0 if bits == 32 else LOGPROB_STEP[bits] / 2


@dataclass(frozen=True)
class Codec:
    """How a cache's values are stored; recorded in the manifest (``identity['codec']``)."""

    preset: str = "balanced"
    logprob_bits: int = 16
    router_bits: int = 8
    vocab_size: int = 0  # 0: no remap (ranks are ids)
    vocab_order: tuple[int, ...] = field(default=(), repr=False)  # ids by descending frequency (a prefix)

    def __post_init__(self):
        check_preset(self.preset)
        for key, bits in (("logprob_bits", self.logprob_bits), ("router_bits", self.router_bits)):
            if bits not in BITS:
                raise ValueError(f"codec {key}={bits} is unknown; allowed: {', '.join(map(str, BITS))}")
        object.__setattr__(self, "vocab_order", tuple(int(i) for i in self.vocab_order))

    @classmethod
    def for_preset(cls, preset: str, vocab_size: int = 0, vocab_order=()) -> "Codec":
        p = check_preset(preset)
        return cls(preset, p.logprob_bits, p.router_bits, vocab_size, tuple(vocab_order))

    def to_dict(self) -> dict:
        return {**asdict(self), "vocab_order": list(self.vocab_order)}

    @cached_property
    def id_of_rank(self) -> np.ndarray:
        """[V] int64: the id at each rank (identity without a remap)."""
        if not self.vocab_size:
            return np.zeros(0, np.int64)
        head = np.asarray(self.vocab_order, np.int64)
        rest = np.setdiff1d(np.arange(self.vocab_size, dtype=np.int64), head, assume_unique=True)
        return np.concatenate([head, rest])

    @cached_property
    def rank_of_id(self) -> np.ndarray:
        """[V] int64: the rank of each id."""
        out = np.empty(len(self.id_of_rank), np.int64)
        out[self.id_of_rank] = np.arange(len(out))
        return out

    def ranks(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(ids, np.int64) if not self.vocab_size else self.rank_of_id[ids]

    def ids(self, ranks: np.ndarray) -> np.ndarray:
        return np.asarray(ranks, np.int64) if not self.vocab_size else self.id_of_rank[ranks]


def frequency_order(token_ids: np.ndarray, vocab_size: int) -> list[int]:
    """The ids that occur in ``token_ids``, by descending count (ties by id): ``Codec.vocab_order``."""
    counts = np.bincount(np.asarray(token_ids, np.int64), minlength=vocab_size)[:vocab_size]
    seen = np.flatnonzero(counts)
    return seen[np.argsort(-counts[seen], kind="stable")].tolist()


# --- log-prob quantiser ------------------------------------------------------------------------


def quantise(logprobs: np.ndarray, bits: int) -> np.ndarray:
    """Log-probs (≤ 0) → stored values: uint8/uint16 steps below 0, or float32 (clamped at MIN_LOGPROB)."""
    lp = np.asarray(logprobs, np.float32)
    if bits == 32:
        return np.maximum(lp, MIN_LOGPROB)
    top = (1 << bits) - 1
    q = np.rint(np.minimum(-lp, top * LOGPROB_STEP[bits]) / LOGPROB_STEP[bits])
    return np.clip(q, 0, top).astype(np.uint8 if bits <= 8 else np.uint16)


def dequantise(stored: np.ndarray, bits: int) -> np.ndarray:
    if bits == 32:
        return np.asarray(stored, np.float32)
    return np.asarray(stored, np.float32) * np.float32(-LOGPROB_STEP[bits])


# --- top-k head: sorted by rank + delta; decoded by descending probability ---------------------


def encode_head(ids_TK: np.ndarray, logprobs_TK: np.ndarray, codec: Codec) -> tuple[np.ndarray, np.ndarray]:
    """(ids, log-probs) in descending-probability order → (rank deltas int32, quantised log-probs)."""
    q_TK = quantise(logprobs_TK, codec.logprob_bits)
    rank_TK = codec.ranks(ids_TK)
    if ids_TK.shape[1] == 0:
        return rank_TK.astype(np.int32), q_TK
    # one sort of (rank, value bits) keys moves both: ~2x a stable argsort + two gathers (phase one's writer)
    bits = 8 * q_TK.dtype.itemsize
    value_bits = q_TK.view(f"uint{bits}") if q_TK.dtype.kind == "f" else q_TK
    key_TK = (rank_TK << 32) | value_bits.astype(np.int64)
    key_TK.sort(axis=1)
    stored = (key_TK & 0xFFFFFFFF).astype(f"uint{bits}")
    return np.diff(key_TK >> 32, axis=1, prepend=0).astype(np.int32), stored.view(q_TK.dtype)


def decode_head(delta_TK: np.ndarray, q_TK: np.ndarray, codec: Codec) -> tuple[np.ndarray, np.ndarray]:
    """The stored pair → (ids int64, log-probs float32) by descending probability (ties: ascending rank)."""
    rank_TK = np.cumsum(delta_TK, axis=1, dtype=np.int64)
    if codec.logprob_bits == 32:
        lp_TK = np.asarray(q_TK, np.float32)
        order_TK = np.argsort(-lp_TK, axis=1, kind="stable")
        return codec.ids(np.take_along_axis(rank_TK, order_TK, 1)), np.take_along_axis(lp_TK, order_TK, 1)
    # one sort of (q, rank) keys orders both: q ascending = log-prob descending, ties by rank
    key_TK = (np.asarray(q_TK).astype(np.int64) << 32) | rank_TK
    key_TK.sort(axis=1)
    return codec.ids(key_TK & 0xFFFFFFFF), dequantise(key_TK >> 32, codec.logprob_bits)


# --- draws: per position, ranks sorted + delta -----------------------------------------------


def count_dtype(largest: int) -> type:
    return np.uint8 if largest <= 255 else np.uint16


def encode_draws(draw_n_T: np.ndarray, ids_D: np.ndarray, counts_D: np.ndarray, logprobs_D: np.ndarray,
                 codec: Codec) -> dict[str, np.ndarray]:
    """Unique draws (any order within a position) → stored arrays: per position ranks ascending, the
    first absolute then deltas (int32), counts and draw_n as uint8 (uint16 past 255 draws), log-probs quantised."""
    n_T = np.asarray(draw_n_T, np.int64)
    pos_D = np.repeat(np.arange(len(n_T), dtype=np.int64), n_T)
    rank_D = codec.ranks(ids_D)
    order_D = np.argsort((pos_D << 32) | rank_D, kind="stable")  # stable: equal ids (not from a teacher) keep their order
    rank_D = rank_D[order_D]
    delta_D = np.diff(rank_D, prepend=0)
    starts = np.cumsum(n_T)[n_T > 0] - n_T[n_T > 0]
    delta_D[starts] = rank_D[starts]
    counts_D = np.asarray(counts_D)[order_D]
    largest = max(int(n_T.max(initial=0)), int(counts_D.max(initial=0)))
    return {"draw_n": n_T.astype(count_dtype(largest)), "draw_ids": delta_D.astype(np.int32),
            "draw_counts": counts_D.astype(count_dtype(largest)),
            "draw_logprobs": quantise(np.asarray(logprobs_D)[order_D], codec.logprob_bits)}


def decode_draw_ids(draw_n_T: np.ndarray, delta_D: np.ndarray, codec: Codec) -> np.ndarray:
    """Stored rank deltas → ids int64, by ascending rank within each position."""
    running_D = np.cumsum(delta_D, dtype=np.int64)
    n_T = np.asarray(draw_n_T, np.int64)
    if not len(running_D):
        return running_D
    ends_T = np.cumsum(n_T)
    before_T = np.where(ends_T - n_T > 0, running_D[np.maximum(ends_T - n_T - 1, 0)], 0)  # sum before a position
    return codec.ids(running_D - np.repeat(before_T, n_T))


# --- router: sorted by expert id + delta, probabilities in that order; decoded in that order ---


def router_id_dtype(num_experts: int) -> str:
    return "uint8" if num_experts <= 256 else "int16"


def encode_router(ids_TLR: np.ndarray, probs_TLR: np.ndarray | None, codec: Codec,
                  num_experts: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(expert ids, probabilities) → (id deltas along R, quantised log-probabilities in the same order)."""
    ids_TLR = np.asarray(ids_TLR, np.int64)
    if ids_TLR.shape[-1] == num_experts and probs_TLR is not None:  # every expert: id order is a scatter, no sort
        rows = np.arange(ids_TLR.size // num_experts)[:, None] * num_experts
        probs = np.empty(ids_TLR.size, np.float32)
        probs[(rows + ids_TLR.reshape(-1, num_experts)).ravel()] = np.asarray(probs_TLR, np.float32).ravel()
        probs = probs.reshape(ids_TLR.shape)
        ids = np.broadcast_to(np.arange(num_experts), ids_TLR.shape)
    else:
        order = np.argsort(ids_TLR, axis=-1)
        ids = np.take_along_axis(ids_TLR, order, -1)
        probs = None if probs_TLR is None else np.take_along_axis(np.asarray(probs_TLR, np.float32), order, -1)
    deltas = np.diff(ids, axis=-1, prepend=0).astype(router_id_dtype(num_experts))
    if probs is None:
        return deltas, None
    if codec.router_bits == 32:
        return deltas, probs
    with np.errstate(divide="ignore"):
        return deltas, quantise(np.log(probs), codec.router_bits)


def prefix_sums(deltas: np.ndarray) -> np.ndarray:
    """Running sums along the last axis, in the deltas' own dtype: one vectorised add per column (numpy's
    cumsum along a short last axis loops per row: 6-10x slower at 8 entries, tests/test_codec.py)."""
    out = np.array(deltas)
    for r in range(1, out.shape[-1]):
        out[..., r] += out[..., r - 1]
    return out


def decode_router(deltas_TLR: np.ndarray, stored_TLR: np.ndarray | None,
                  codec: Codec) -> tuple[np.ndarray, np.ndarray | None]:
    """→ (expert ids uint8/int16, probabilities float32), both by ascending expert id, the stored order (no sort
    back to descending probability: every consumer scatters by id, and the one that needs the routed experts
    first, ``cache.stats.expert_load``, selects them by probability); an ids-only cache: (ids, None)."""
    ids = prefix_sums(deltas_TLR)
    if stored_TLR is None:
        return ids, None
    if codec.router_bits == 32:
        return ids, np.asarray(stored_TLR, np.float32)
    return ids, np.exp(dequantise(stored_TLR, codec.router_bits))
