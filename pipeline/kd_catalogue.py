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
