"""The KD divergence catalogue (issue 4): pure maths on already-built distributions.

pipeline/losses.py turns a cache chunk and the student's logits into the tensors these
functions take (bucketed log-probs, top-k values) and owns dispatch; this file imports
nothing from it. Formulas and what each one approximates with a top-k cache: docs/losses.md.

Shape legend (suffixes on tensor names):
  C  tokens (rows) of a chunk       B  buckets: the teacher's cached top-k (+1 tail bucket)
  K  top-k entries                  V  student vocabulary
  M  pairs of top-k entries, k(k-1)/2 (BiLD)
``lq_CB`` are the teacher's log-probs, ``ls_CB`` the student's, over the same buckets; bucket 0
is the teacher's argmax (the cache stores the top-k by descending probability). A teacher
bucket may be exactly 0 (log-prob -inf: a tail clamped at 0); the student's never is.
Every function returns a per-token loss [C], not multiplied by tau^2.
"""

from __future__ import annotations

import math

import torch


def _finite(l_CB: torch.Tensor) -> torch.Tensor:
    """-inf log-probs made finite so that ``0 * (l - x)`` is 0 rather than NaN."""
    return l_CB.clamp_min(torch.finfo(l_CB.dtype).min)


def kl_div(lp_CB: torch.Tensor, lq_CB: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_b p_b (log p_b - log q_b), terms with p_b = 0 dropped."""
    return (lp_CB.exp() * (_finite(lp_CB) - lq_CB)).sum(-1)


def _log_mix(w: float, la_CB: torch.Tensor, lb_CB: torch.Tensor) -> torch.Tensor:
    """log(w a + (1 - w) b) from log a, log b, for 0 < w < 1."""
    return torch.logaddexp(la_CB + math.log(w), lb_CB + math.log1p(-w))


# --- divergences between bucketed distributions (q = teacher, p = student) -----------------


def reverse_kl(lq_CB: torch.Tensor, ls_CB: torch.Tensor) -> torch.Tensor:
    """KL(p || q). Mode-seeking; the caller floors a zero teacher tail (else it is +inf)."""
    return kl_div(ls_CB, lq_CB)


def jsd(lq_CB: torch.Tensor, ls_CB: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD (GKD): beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p."""
    lm_CB = _log_mix(beta, lq_CB, ls_CB)
    return beta * kl_div(lq_CB, lm_CB) + (1 - beta) * kl_div(ls_CB, lm_CB)


def skew_forward_kl(lq_CB: torch.Tensor, ls_CB: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM's skew KL: KL(q || alpha q + (1 - alpha) p)."""
    return kl_div(lq_CB, _log_mix(alpha, lq_CB, ls_CB))


def skew_reverse_kl(lq_CB: torch.Tensor, ls_CB: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM's skew reverse KL: KL(p || alpha p + (1 - alpha) q)."""
    return kl_div(ls_CB, _log_mix(alpha, ls_CB, lq_CB))


def tvd(lq_CB: torch.Tensor, ls_CB: torch.Tensor) -> torch.Tensor:
    """Total variation: 1/2 sum_b |q_b - p_b|."""
    return 0.5 * (lq_CB.exp() - ls_CB.exp()).abs().sum(-1)


def _split_target(l_CB: torch.Tensor):
    """(log target mass, log non-target mass, non-target log-probs renormalised), target = bucket 0."""
    l_nt_C = torch.logsumexp(l_CB[:, 1:], -1)
    return l_CB[:, 0], l_nt_C, l_CB[:, 1:] - _finite(l_nt_C)[:, None]


def dkd(lq_CB: torch.Tensor, ls_CB: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Decoupled KD: alpha TCKD + beta NCKD, target = the teacher's argmax (bucket 0).

    TCKD = KL([q_t, 1 - q_t] || [p_t, 1 - p_t]); NCKD = KL(q_hat || p_hat) over the non-target
    buckets, each side renormalised. Masses come from logsumexp, never from 1 - p_t.
    """
    lq_t, lq_nt, lq_hat = _split_target(lq_CB)
    ls_t, ls_nt, ls_hat = _split_target(ls_CB)
    tckd = kl_div(torch.stack([lq_t, lq_nt], -1), torch.stack([ls_t, ls_nt], -1))
    return alpha * tckd + beta * kl_div(lq_hat, ls_hat)


def nkd(lq1_CB, ls1_CB, lq_CB, ls_CB, gamma: float, tau: float) -> torch.Tensor:
    """Normalized KD: -q_t log p_t / tau^2 - gamma sum_{b != t} q_hat_b log p_hat_b.

    The target term uses the tau = 1 buckets (lq1, ls1), the non-target term the tau buckets
    (renormalised without the target). The first term is divided by tau^2 so that the caller's
    tau^2 reproduces NKD's loss exactly. Cross-entropy form, as in NKD: not 0 at p = q.
    """
    target = -lq1_CB[:, 0].exp() * ls1_CB[:, 0]
    _, _, lq_hat = _split_target(lq_CB)
    _, _, ls_hat = _split_target(ls_CB)
    return target / tau**2 - gamma * (lq_hat.exp() * ls_hat).sum(-1)


def normkd_temperatures(lq_CK: torch.Tensor, s_CK: torch.Tensor, t_norm: float):
    """NormKD's per-token temperatures T_norm * std, teacher's and student's, over the same K.

    std is the unbiased standard deviation (as NormKD's reference code) of the teacher's cached
    log-probs (= of its cached logits: a shift changes no std) and of the student's logits at
    those ids; floored at 1e-6.
    """
    return t_norm * lq_CK.std(-1).clamp_min(1e-6), t_norm * s_CK.std(-1).clamp_min(1e-6)


# --- BiLD ---------------------------------------------------------------------------------


def _pair_kl(t_CK: torch.Tensor, s_CK: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(teacher pair differences) || softmax(student's)), pairs i < j in the given order."""
    i, j = torch.triu_indices(t_CK.shape[-1], t_CK.shape[-1], 1, device=t_CK.device)
    dt_CM = (t_CK[:, i] - t_CK[:, j]) / tau
    ds_CM = (s_CK[:, i] - s_CK[:, j]) / tau
    return kl_div(torch.log_softmax(dt_CM, -1), torch.log_softmax(ds_CM, -1))


def teacher_at(ids_CN, cached_ids_CK, lq_CK, log_tail_C, vocab: int) -> torch.Tensor:
    """The teacher's log-prob at ids_CN: cached where cached, else a uniform share of the tail.

    Fallback: log(tail / (V - K)), capped at the smallest cached log-prob (an uncached id cannot
    outrank a cached one). A zero tail counts as finfo.tiny so the value stays finite.
    """
    hit_CNK = ids_CN[:, :, None] == cached_ids_CK[:, None, :]
    cached_CN = torch.where(hit_CNK, lq_CK[:, None, :], torch.zeros_like(lq_CK[:, None, :])).sum(-1)
    n_rest = max(vocab - cached_ids_CK.shape[-1], 1)
    tail_C = log_tail_C.clamp_min(math.log(torch.finfo(lq_CK.dtype).tiny)) - math.log(n_rest)
    share_C = torch.minimum(tail_C, lq_CK.min(-1).values)
    return torch.where(hit_CNK.any(-1), cached_CN, share_C[:, None])


def bild(s_CV, cached_ids_CK, lq_CK, log_tail_C, k: int, tau: float) -> torch.Tensor:
    """BiLD = t-LD + s-LD over the top-k logit differences (Li et al., COLING 2025).

    t-LD: the teacher's top-k (its first k cached entries), student logits at those ids;
    s-LD: the student's top-k, teacher values via teacher_at. In each half the pairs i < j
    follow the leading side's ranking; both are KL(teacher || student) of the softmaxes of the
    pairwise differences / tau. The teacher's "logits" are its tau=1 log-probs: differences of
    log-probs equal differences of logits.
    """
    ids_CK = cached_ids_CK[:, :k]
    t_led = _pair_kl(lq_CK[:, :k], s_CV.gather(-1, ids_CK), tau)
    s_top_CK, s_ids_CK = s_CV.topk(k, -1)
    t_vals_CK = teacher_at(s_ids_CK, cached_ids_CK, lq_CK, log_tail_C, s_CV.shape[-1]).to(s_CV.dtype)
    return t_led + _pair_kl(t_vals_CK, s_top_CK, tau)
