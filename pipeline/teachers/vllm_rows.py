"""vLLM's flat log-probs → cache fields, with numpy only (importable, and tested, without vllm).

With ``flat_logprobs=True`` every scored position holds exactly 1 + n entries: the actual (or
sampled) token first, then the top-n by descending probability. Ids >= the tokenizer's
vocabulary are padding rows of the embedding (Qwen: 151,936 rows for 151,669 tokens); they can
take a place in the top-n. Asking every position for k + (all padding rows) entries — 331
instead of 64 for Qwen — makes vLLM build and ship 5x the entries for the rare row that needs
them, so the teacher asks for k and re-scores only the sequences where a padding id took one
of the k places (``sequences_short_of_k``), asking those for ``logprobs_asked(...)[1]``.
"""

from __future__ import annotations

import itertools

import numpy as np


def logprobs_asked(k: int, vocab_size: int, vocab_limit: int) -> tuple[int, int]:
    """(entries asked per position, entries asked when re-scoring a sequence a padding id cut short).

    The second guarantees k real ids even if every padding id outranks them."""
    n_pad = max(0, vocab_size - vocab_limit) if vocab_limit else 0
    return k, k + n_pad


def flat_rows(flats: list, width: int) -> tuple[np.ndarray, np.ndarray]:
    """FlatLogprobs of consecutive positions → (ids, log-probs), each [rows, width]."""
    ids = np.fromiter(itertools.chain.from_iterable(f.token_ids for f in flats), dtype=np.int64)
    lps = np.fromiter(itertools.chain.from_iterable(f.logprobs for f in flats), dtype=np.float32)
    assert ids.size % width == 0, f"flat log-probs are not {width} entries per position"
    return ids.reshape(-1, width), lps.reshape(-1, width)


def _flats(outputs: list) -> list:
    return [f for o in outputs for f in (o.prompt_logprobs, o.outputs[0].logprobs)]


def sequences_short_of_k(outputs: list, k: int, n_logprobs: int, vocab_limit: int) -> list[int]:
    """Indices of the outputs (asked for ``n_logprobs`` entries) where some position has fewer than k real ids."""
    if not vocab_limit or not outputs:
        return []
    ids_TW, _ = flat_rows(_flats(outputs), 1 + n_logprobs)
    real_T = (ids_TW[:, 1:] < vocab_limit).sum(1)
    starts = np.concatenate([[0], np.cumsum([len(o.prompt_token_ids) for o in outputs])[:-1]])
    return np.flatnonzero(np.minimum.reduceat(real_T, starts) < k).tolist()


def top_k_real(ids_TN: np.ndarray, lps_TN: np.ndarray, k: int, vocab_limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k entries whose id is a real token (ids >= vocab_limit are vocabulary padding)."""
    if not vocab_limit or ids_TN.shape[1] == k:
        return ids_TN[:, :k], lps_TN[:, :k]
    order_TN = np.argsort(ids_TN >= vocab_limit, axis=1, kind="stable")[:, :k]  # real ids first, order kept
    return np.take_along_axis(ids_TN, order_TN, 1), np.take_along_axis(lps_TN, order_TN, 1)


def cache_fields(outputs: list, k: int, n_logprobs: int | list[int], vocab_limit: int) -> dict[str, np.ndarray]:
    """RequestOutputs (one per sequence, in batch order) → flat cache fields over T positions.

    Per sequence of n tokens the rows are its n-1 prompt entries (prompt entry 0 is empty)
    then the generated token's entry: exactly n rows, position i in row i. ``n_logprobs`` is
    the entries each output was asked for: one number, or one per output (re-scored ones differ).
    """
    widths = [n_logprobs] * len(outputs) if isinstance(n_logprobs, int) else list(n_logprobs)
    ids, lps, targets = [], [], []
    for width, run in itertools.groupby(zip(outputs, widths), key=lambda pair: pair[1]):
        ids_TW, lps_TW = flat_rows(_flats([o for o, _ in run]), 1 + width)
        top_ids, top_lps = top_k_real(ids_TW[:, 1:], lps_TW[:, 1:], k, vocab_limit)
        ids.append(top_ids)
        lps.append(top_lps)
        targets.append(lps_TW[:, 0])
    lengths = np.array([len(o.prompt_token_ids) for o in outputs])
    target_T = np.concatenate(targets)
    target_T[np.cumsum(lengths) - 1] = 0.0  # the last position has no next token (its column 0 is the sampled one)
    return {"topk_ids": np.concatenate(ids).astype(np.int32), "topk_logprobs": np.concatenate(lps),
            "target_logprob": target_T,
            # gauge z := log p, so logZ_1 = log sum exp(log p) = 0 exactly (see docs/vllm.md)
            "log_partition": np.zeros((len(target_T), 1), dtype=np.float32)}
