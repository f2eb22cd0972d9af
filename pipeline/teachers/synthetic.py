"""A real-shape synthetic teacher signal (numpy only), for storage and reader benchmarks and tests.

The shape is a Qwen3-30B-A3B-class teacher: vocabulary 151,936, 48 MoE layers × 128 experts, top-8
routing. Real logits at that shape cannot be produced here (no such model runs on this machine), so the
next-token distributions are generated from statistics that are documented for LLMs of that class; the
benchmarks print the statistics a run actually produced beside the bytes (scripts/bench_storage.py):

- **unigram prior**: Zipf's law, frequency ∝ 1/(rank + 2.7) (exponent 1: Zipf 1949; Piantadosi 2014,
  "Zipf's word frequency law in natural language"; the 2.7 offset is Mandelbrot's correction for the
  flattened head). Ranks map to ids through a fixed random permutation, so a cache's frequency remap has
  to learn the order from the data, as with a real tokenizer.
- **next-token distribution**: logits z_v = ALPHA·log prior(v) + SIGMA·ε_v (ε standard normal per position
  and token: context moves tokens up and down) plus a boost ~ N(BOOST_MEAN, BOOST_SD) on one context token
  drawn from the prior. ALPHA, SIGMA and the boost were fitted (by hand, on 1,024 positions) to a mean
  entropy of 2-3 nats and a mean top-1 probability of ~0.5: the per-token cross-entropy of 7B-30B LLMs on
  web text is ~2-2.5 nats (an upper bound on their entropy) and their top-1 next-token accuracy ~50%.
  Only the HEAD most frequent ranks get noise; the rest keep the prior's shape (their mass, ~1e-4, is
  kept exactly in the normaliser and in the draws).
- **router**: per layer, logits = an expert bias ~ N(0, ROUTER_BIAS_SD) (load imbalance) + N(0, 1) per
  token; probabilities = softmax over the 128 experts, the top-8 are routed. Chosen so the top-8 hold
  about half of the router mass, an assumption (no published statistic for this).

Shapes: T positions, V vocabulary, H noisy head ranks, N draws, L layers, E experts, R router entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VOCAB, MOE_LAYERS, EXPERTS, ROUTED = 151_936, 48, 128, 8
ALPHA, SIGMA, BOOST_MEAN, BOOST_SD = 1.8, 1.2, 7.5, 2.5
ZIPF_OFFSET = 2.7
ROUTER_BIAS_SD = 0.5


@dataclass(frozen=True)
class SyntheticTeacher:
    vocab: int = VOCAB
    head: int = 16384  # ranks with per-position noise
    layers: int = MOE_LAYERS
    experts: int = EXPERTS
    seed: int = 0

    def prior(self) -> np.ndarray:
        """log prior over ranks [V] (Zipf-Mandelbrot), normalised."""
        logp = -np.log(np.arange(self.vocab, dtype=np.float64) + ZIPF_OFFSET)
        return logp - np.logaddexp.reduce(logp)

    def permutation(self) -> np.ndarray:
        """id of each rank [V]."""
        return np.random.default_rng([self.seed, 1]).permutation(self.vocab)

    def distributions(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(log-probs of the head ranks [n, H] float32, log-probs of the tail ranks' shared shape [V-H] float64,
        per-position log tail normaliser offset [n]): log p(rank r ≥ H) = tail[r - H] - log_z[i]."""
        prior = self.prior()
        z_nH = (ALPHA * prior[None, :self.head] + SIGMA * rng.standard_normal((n, self.head))).astype(np.float32)
        peak_n = np.minimum(rng.choice(self.vocab, n, p=np.exp(prior)), self.head - 1)
        z_nH[np.arange(n), peak_n] += rng.normal(BOOST_MEAN, BOOST_SD, n).astype(np.float32)
        tail = ALPHA * prior[self.head:]
        log_z_n = np.logaddexp(np.logaddexp.reduce(z_nH.astype(np.float64), axis=1), np.logaddexp.reduce(tail))
        return (z_nH - log_z_n[:, None]).astype(np.float32), tail, log_z_n


def draw_ranks(rng: np.random.Generator, lp_nH: np.ndarray, tail: np.ndarray, log_z_n: np.ndarray,
               num: int) -> np.ndarray:
    """[n, num] ranks drawn by inverse CDF from each position's full distribution (head, then the tail)."""
    n, head = lp_nH.shape
    cdf_nH = np.cumsum(np.exp(lp_nH.astype(np.float64)), axis=1)
    u_nN = rng.random((n, num))
    flat = (cdf_nH + np.arange(n)[:, None]).ravel()  # rows made globally increasing: one searchsorted
    pos = np.searchsorted(flat, (u_nN + np.arange(n)[:, None]).ravel()).reshape(n, num) - np.arange(n)[:, None] * head
    in_tail = pos >= head
    if in_tail.any():  # rare (~1e-4): a rank of the tail by its fixed shape
        tail_cdf = np.cumsum(np.exp(tail - np.logaddexp.reduce(tail)))
        pos[in_tail] = head + np.minimum(np.searchsorted(tail_cdf, rng.random(int(in_tail.sum()))), len(tail) - 1)
    return pos


def router_signal(rng: np.random.Generator, t: int, layers: int, experts: int, topk: int,
                  bias_LE: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids [t, L, topk] int32, probs [t, L, topk] float32) by descending router probability."""
    logits = bias_LE[None] + rng.standard_normal((t, layers, experts)).astype(np.float32)
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    ids = np.argsort(-probs, axis=-1, kind="stable")[..., :topk]
    return ids.astype(np.int32), np.take_along_axis(probs, ids, -1).astype(np.float32)


def teacher_record(teacher: SyntheticTeacher, n_seqs: int, seq_len: int, *, k: int, num_draws: int,
                   router_topk: int, first_sample: int = 0, chunk: int = 512) -> dict[str, np.ndarray]:
    """A batch record as a backend hands it to the writer (float32 log-probs, the exact values; the gauge
    log Z_1 = 0), for n_seqs sequences whose tokens are sampled from the teacher itself."""
    rng = np.random.default_rng([teacher.seed, first_sample])  # distributions and text: the same for any num_draws
    draw_rng = np.random.default_rng([teacher.seed, first_sample, 1])
    perm = teacher.permutation()
    t = n_seqs * seq_len
    parts: dict[str, list] = {}
    for start in range(0, t, chunk):
        n = min(chunk, t - start)
        lp_nH, tail, log_z_n = teacher.distributions(rng, n)
        nxt_n = draw_ranks(rng, lp_nH, tail, log_z_n, 1)[:, 0]  # the next token of the text
        ranks = np.concatenate([nxt_n[:, None], draw_ranks(draw_rng, lp_nH, tail, log_z_n, num_draws)], 1)
        parts.setdefault("next", []).append(perm[nxt_n])
        parts.setdefault("target_logprob", []).append(rank_logprob(lp_nH, tail, log_z_n, nxt_n[:, None])[:, 0])
        if k:
            top_nK = np.argsort(-lp_nH, axis=1, kind="stable")[:, :k]
            parts.setdefault("topk_ids", []).append(perm[top_nK].astype(np.int32))
            parts.setdefault("topk_logprobs", []).append(np.take_along_axis(lp_nH, top_nK, 1))
        if num_draws:
            row_nN = np.repeat(np.arange(n)[:, None], num_draws, 1)
            keys, counts = np.unique(row_nN * teacher.vocab + ranks[:, 1:], return_counts=True)
            rows, rank_D = keys // teacher.vocab, keys % teacher.vocab
            parts.setdefault("draw_n", []).append(np.bincount(rows, minlength=n))
            parts.setdefault("draw_ids", []).append(perm[rank_D].astype(np.int32))
            parts.setdefault("draw_counts", []).append(counts.astype(np.int32))
            parts.setdefault("draw_logprobs", []).append(
                rank_logprob(lp_nH[rows], tail, log_z_n[rows], rank_D[:, None])[:, 0])
    out = {key: np.concatenate(v) for key, v in parts.items()}
    nxt = out.pop("next")
    # the text: position i's token is the one drawn at i - 1 (the first one from the prior's head)
    input_ids = np.concatenate([[perm[0]], nxt[:-1]]).astype(np.int32)
    last = np.arange(seq_len - 1, t, seq_len)
    out["target_logprob"][last] = 0.0
    out.update(sample_ids=np.arange(first_sample, first_sample + n_seqs, dtype=np.int64),
               seq_lens=np.full(n_seqs, seq_len, np.int64), input_ids=input_ids,
               loss_mask=np.ones(t, np.uint8), log_partition=np.zeros((t, 1), np.float32))
    if router_topk:
        bias_LE = np.random.default_rng([teacher.seed, 2]).normal(0, ROUTER_BIAS_SD, (teacher.layers, teacher.experts))
        out["router_ids"], out["router_probs"] = router_signal(rng, t, teacher.layers, teacher.experts, router_topk,
                                                               bias_LE.astype(np.float32))
    return out


def rank_logprob(lp_nH: np.ndarray, tail: np.ndarray, log_z_n: np.ndarray, ranks_nM: np.ndarray) -> np.ndarray:
    """Exact float32 log-probs of ranks [n, M] (head ranks from lp, tail ranks from the tail's shape)."""
    head = lp_nH.shape[1]
    inside = ranks_nM < head
    lp = np.take_along_axis(lp_nH, np.minimum(ranks_nM, head - 1), 1)
    tail_lp = tail[np.clip(ranks_nM - head, 0, len(tail) - 1)] - log_z_n[:, None]
    return np.where(inside, lp, tail_lp).astype(np.float32)


def signal_statistics(teacher: SyntheticTeacher, n: int = 1024, seed: int = 7) -> dict:
    """Mean entropy (nats), mean top-1 probability and the tail mass of n generated positions."""
    lp_nH, tail, log_z_n = teacher.distributions(np.random.default_rng(seed), n)
    p_nH = np.exp(lp_nH.astype(np.float64))
    tail_lp = tail[None, :] - log_z_n[:, None]
    entropy = -(p_nH * lp_nH).sum(1) - (np.exp(tail_lp) * tail_lp).sum(1)
    return {"entropy_mean": float(entropy.mean()), "entropy_p50": float(np.median(entropy)),
            "top1_mean": float(p_nH.max(1).mean()), "tail_mass_mean": float(1 - p_nH.sum(1).mean())}
