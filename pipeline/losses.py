"""KD loss core: teacher targets from a top-k cache, dispatch over KD_LOSSES, and the
token-chunked CE + KD over the student's LM head. The divergences themselves are in
pipeline/kd_catalogue.py; formulas and approximations in docs/losses.md.

Shape legend (suffixes on tensor names):
  T  valid tokens of the batch          C  rows of one chunk (a slice of T)
  V  student vocabulary (after vocab_limit, the teacher's real vocabulary)
  H  hidden size                        K  cached teacher top-k entries
  B  buckets: K, plus one tail bucket   P  cached temperatures (P[0] is tau = 1)
  D  stored draws per token (padded)

Every KD loss maps (student_logits_CV, teacher chunk, spec) to a per-token loss [C] in fp32
(fp64 stays fp64, for gradcheck), NOT multiplied by tau^2: the trainer does that (kd_weight), and
normalises the sums returned by chunked_lm_losses by its global count of valid tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from cache.schema import TeacherRecord
from pipeline import kd_catalogue as cat

MISSING_MASS = ("tail_bucket", "renormalize")


def lm_targets(teacher: TeacherRecord) -> TeacherRecord:
    """The record's fields the LM-head losses read (router data and the target log-prob stay out of
    their per-chunk row selections)."""
    return replace(teacher, router_ids=None, router_probs=None, target_logprob=None)


def take_rows(teacher: TeacherRecord, rows_R: torch.Tensor) -> TeacherRecord:
    """The rows listed in rows_R (int64) of every array of the record."""
    return teacher.map(lambda t: t.index_select(0, rows_R))


def take_span(teacher: TeacherRecord, start: int, stop: int) -> TeacherRecord:
    """Rows start:stop of every array of the record (views)."""
    return teacher.map(lambda t: t[start:stop])


def draw_weights(teacher: TeacherRecord, tau: float | None = None) -> torch.Tensor:
    """[T, D] float32 weights of the stored draws, summing to 1 per token (0 on padding) as a target
    for the teacher at temperature tau (None: the draw temperature).

    At the draw temperature: counts / N, the empirical distribution of the N draws (unbiased). At
    another tau, with the teacher's log-prob at each draw stored (format v2, ``draw_logprobs``):
    self-normalised importance weights, w_d ∝ c_d · q^tau(d) / q^tau_draw(d) ∝ c_d ·
    exp(lp_d (1/tau − 1/tau_draw)) (the log-partitions cancel in the normalisation), a consistent
    estimate of the target q^tau (docs/losses.md). Without them another tau is an error: the
    trainer refuses it at start (train_setup.check_draw_temperature)."""
    counts_TD = teacher.draw_counts.float()
    if tau is None or math.isclose(tau, teacher.draw_temperature, rel_tol=1e-6):
        return counts_TD / counts_TD.sum(-1, keepdim=True).clamp_min(1.0)
    if teacher.draw_logprobs is None:
        raise ValueError(f"draws made at temperature {teacher.draw_temperature} cannot give a target at tau={tau} "
                         "without the teacher's log-probs at the draws (a format v2 cache)")
    shift = 1.0 / tau - 1.0 / teacher.draw_temperature
    log_w_TD = torch.where(counts_TD > 0, counts_TD.clamp_min(1.0).log() + shift * _fp32(teacher.draw_logprobs),
                           float("-inf"))
    w_TD = torch.softmax(log_w_TD, -1)
    return torch.where(counts_TD.sum(-1, keepdim=True) > 0, w_TD, torch.zeros_like(w_TD))  # a row without draws: 0


@dataclass(frozen=True)
class KDSpec:
    """Which KD divergence, at which temperature, with which missing-mass treatment."""

    name: str = "forward_kl"  # key of KD_LOSSES
    temperature: float = 1.0  # tau for both sides (normkd: T_norm, the per-token scale)
    missing_mass: str = "tail_bucket"  # "tail_bucket" (one extra class) | "renormalize" (zero tail)
    jsd_beta: float = 0.5  # jsd: weight of the teacher in the mixture, 0 < beta < 1
    skew_alpha: float = 0.1  # skew_*: weight of the first argument in the skewed mixture
    dkd_alpha: float = 1.0  # dkd: weight of the target-class term (TCKD)
    dkd_beta: float = 8.0  # dkd: weight of the non-target term (NCKD)
    nkd_gamma: float = 1.5  # nkd: weight of the non-target term
    top_kl_k: int = 0  # top_kl: use the teacher's first k cached entries (0 = all cached)
    bild_top_k: int = 8  # bild: k of both halves (clipped to the cached K)

    def __post_init__(self) -> None:
        if self.name not in KD_LOSSES:
            raise ValueError(f"KDSpec.name={self.name!r} is not a KD loss; choose one of {sorted(KD_LOSSES)}")
        if self.missing_mass not in MISSING_MASS:
            raise ValueError(f"KDSpec.missing_mass={self.missing_mass!r}; choose one of {MISSING_MASS}")
        if not self.temperature > 0:
            raise ValueError(f"KDSpec.temperature must be > 0, got {self.temperature}")
        for key in ("jsd_beta", "skew_alpha"):
            if not 0 < getattr(self, key) < 1:
                raise ValueError(f"KDSpec.{key} must lie in (0, 1), got {getattr(self, key)}")
        if self.bild_top_k < 2 or self.top_kl_k < 0:
            raise ValueError("KDSpec.bild_top_k must be >= 2 and KDSpec.top_kl_k >= 0")


# --- the teacher side ---------------------------------------------------------------------


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)), stable for x <= 0 (x is clamped to <= 0, so x >= 0 gives -inf)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _cached_index(temperatures: tuple[float, ...], tau: float) -> int | None:
    return next((j for j, t in enumerate(temperatures) if abs(t - tau) <= 1e-6 * max(1.0, tau)), None)


def _tail_as_one_logit(lp_TK: torch.Tensor, tau: float | torch.Tensor, empty_tail: bool = False):
    """Uncached tau: the tau=1 tail mass m = 1 - sum exp(lp) acts as ONE extra logit log m.

    log_softmax([lp_1..lp_K, log m] / tau). The top-k ratios are exact (lp_i - lp_j = z_i - z_j);
    the tail is approximated: the true tail mass at tau is proportional to sum_tail p_v^(1/tau),
    this uses (sum_tail p_v)^(1/tau), as if the tail were a single token. So for tau > 1 the
    tail is under-weighted (x^(1/tau) is subadditive), for tau < 1 over-weighted; exact when
    the tail is empty (K = V) or holds one token. Beware: a tail that is only rounding noise
    (m ~ 1e-4 with fp16-stored log-probs) is amplified too, to m^(1/tau) (0.1 at tau = 4).
    """
    log_m_T = log1mexp(torch.logsumexp(lp_TK, -1))
    if empty_tail:
        log_m_T = torch.full_like(log_m_T, float("-inf"))
    l_TB = torch.log_softmax(torch.cat([lp_TK, log_m_T[:, None]], -1) / tau, -1)
    return l_TB[:, :-1], l_TB[:, -1]


def teacher_logprobs(teacher: TeacherRecord, tau: float, missing_mass: str, vocab_size: int = 0):
    """The teacher's top-k log-probs at temperature tau, and its tail log-mass.

    Returns (lq_TK, log_tail_T); log_tail_T is None for missing_mass="renormalize".
    - renormalize: log_softmax(lp / tau) over the K cached entries (exact renormalised top-k
      at any tau; the tail is dropped, which is biased: the student learns an over-confident
      teacher).
    - tail_bucket, tau cached (temperatures[j] == tau): exact,
      lq_i = (lp_i + logZ_1) / tau - logZ_tau, tail = 1 - sum exp(lq) clamped at >= 0.
    - tail_bucket, tau not cached: the single-tail-logit approximation of _tail_as_one_logit.
    vocab_size > 0 and K >= vocab_size: the cache holds the whole vocabulary, so the tail is
    exactly empty (log -inf) whatever the rounding of 1 - sum exp(lp) says.
    """
    if missing_mass not in MISSING_MASS:
        raise ValueError(f"missing_mass={missing_mass!r}; choose one of {MISSING_MASS}")
    if teacher.topk_logprobs is None or teacher.topk_ids is None:
        raise ValueError("this cache holds no teacher top-k; use the 'sampled' KD loss")
    lp_TK = _fp32(teacher.topk_logprobs)
    if missing_mass == "renormalize":
        return torch.log_softmax(lp_TK / tau, -1), None
    empty_tail = 0 < vocab_size <= lp_TK.shape[-1]
    j = _cached_index(teacher.temperatures, tau)
    if j is None:
        return _tail_as_one_logit(lp_TK, tau, empty_tail)
    logz_TP = _fp32(teacher.log_partition)
    lq_TK = (lp_TK + logz_TP[:, :1]) / tau - logz_TP[:, j : j + 1]
    log_tail_T = log1mexp(torch.logsumexp(lq_TK, -1))
    return lq_TK, torch.full_like(log_tail_T, float("-inf")) if empty_tail else log_tail_T


# --- the student side ---------------------------------------------------------------------


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32: half precisions go up, fp64 stays (gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def student_logprobs(student_logits_CV: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(_fp32(student_logits_CV) / tau, -1)


def student_log_tail(ls_CV: torch.Tensor, ids_CK: torch.Tensor) -> torch.Tensor:
    """log of the student's mass outside ids_CK: a logsumexp over the other log-probs.

    Computed directly over the uncached ids (no 1 - sum cancellation). An empty tail (K = V)
    gives log(finfo.tiny), finite, with a zero gradient instead of the NaN of logsumexp(-inf).
    """
    rest_CV = ls_CV.scatter(-1, ids_CK, float("-inf"))
    top_C1 = rest_CV.amax(-1, keepdim=True).detach()
    top_C1 = torch.where(torch.isfinite(top_C1), top_C1, torch.zeros_like(top_C1))
    total_C = (rest_CV - top_C1).exp().sum(-1).clamp_min(torch.finfo(ls_CV.dtype).tiny)
    return top_C1[:, 0] + total_C.log()


def to_buckets(lq_CK, lq_tail_C, ls_CV, ids_CK):
    """Teacher and student log-probs over the same buckets: K (renormalised) or K + tail.

    A cache of the whole vocabulary (K >= V) has no tail: both sides get the K buckets only.
    """
    ls_CK = ls_CV.gather(-1, ids_CK)
    lq_CK = lq_CK.to(ls_CV.dtype)
    if lq_tail_C is None or ids_CK.shape[-1] >= ls_CV.shape[-1]:
        return lq_CK, torch.log_softmax(ls_CK, -1)
    lq_CB = torch.cat([lq_CK, lq_tail_C.to(ls_CV.dtype)[:, None]], -1)
    return lq_CB, torch.cat([ls_CK, student_log_tail(ls_CV, ids_CK)[:, None]], -1)


def temper(l_CB: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """log_softmax(l / tau): a distribution over buckets tempered as if each bucket were one token."""
    return torch.log_softmax(l_CB / tau, -1)


def bucket_logprobs(student_logits_CV, teacher: TeacherRecord, tau: float, missing_mass: str):
    """(lq_CB, ls_CB): both sides at temperature tau over the teacher's top-k (+ tail).

    tail_bucket at a tau the cache lacks: both sides' exact tau = 1 buckets, tempered alike
    (temper); for the teacher that is _tail_as_one_logit, and treating the student the same way
    keeps the divergence 0 at p = q and exact when K = V.
    """
    if missing_mass == "tail_bucket" and _cached_index(teacher.temperatures, tau) is None:
        lq_CB, ls_CB = bucket_logprobs(student_logits_CV, teacher, 1.0, missing_mass)
        return temper(lq_CB, tau), temper(ls_CB, tau)
    lq_CK, lq_tail_C = teacher_logprobs(teacher, tau, missing_mass, student_logits_CV.shape[-1])
    ls_CV = student_logprobs(student_logits_CV, tau)
    return to_buckets(lq_CK, lq_tail_C, ls_CV, teacher.topk_ids)


# --- the issue-3 losses -------------------------------------------------------------------


def forward_kl(student_logits_CV, teacher: TeacherRecord, spec: KDSpec) -> torch.Tensor:
    """KL(q_T^tau || p_S^tau) over the teacher's top-k (+ tail bucket)."""
    return cat.kl_div(*bucket_logprobs(student_logits_CV, teacher, spec.temperature, spec.missing_mass))


def sampled(student_logits_CV, teacher: TeacherRecord, spec: KDSpec) -> torch.Tensor:
    """-sum_d w_d log p_S^tau(id_d): CE to the empirical distribution of the cached draws.

    At the cache's draw temperature (usually 1) w_d = c_d / N, an unbiased estimate of
    CE(q_T^tau || p_S^tau), hence of forward KL up to the teacher's entropy (a constant); at another
    tau, self-normalised importance weights from the stored draw log-probs (draw_weights). Ignores
    the top-k and missing_mass.
    """
    if teacher.draw_ids is None:
        raise ValueError("the 'sampled' KD loss needs a cache with draws (draw_ids, draw_counts)")
    ls_CV = student_logprobs(student_logits_CV, spec.temperature)
    ls_CD = ls_CV.gather(-1, teacher.draw_ids)
    return -(draw_weights(teacher, spec.temperature).to(ls_CD.dtype) * ls_CD).sum(-1)


# --- the issue-4 catalogue: cache -> tensors here, maths in kd_catalogue ----------------------

REVERSE_TAIL_FLOOR = 1e-6  # reverse_kl: a teacher tail below this (top-k summing to ~1) counts as this


def reverse_kl(student_logits_CV, teacher: TeacherRecord, spec: KDSpec) -> torch.Tensor:
    """KL(p_S^tau || q_T^tau) over the top-k (+ tail, floored at REVERSE_TAIL_FLOOR)."""
    lq_CB, ls_CB = bucket_logprobs(student_logits_CV, teacher, spec.temperature, spec.missing_mass)
    if lq_CB.shape[-1] > teacher.topk_ids.shape[-1]:  # there is a tail bucket
        lq_CB = torch.cat([lq_CB[:, :-1], lq_CB[:, -1:].clamp_min(math.log(REVERSE_TAIL_FLOOR))], -1)
    return cat.reverse_kl(lq_CB, ls_CB)


def top_kl(student_logits_CV, teacher: TeacherRecord, spec: KDSpec) -> torch.Tensor:
    """BiLD's "top-k KL": forward KL with both sides renormalised over the teacher's first
    top_kl_k cached ids (all cached if 0); ignores missing_mass."""
    k = spec.top_kl_k or teacher.topk_ids.shape[-1]
    top = replace(teacher, topk_ids=teacher.topk_ids[:, :k], topk_logprobs=teacher.topk_logprobs[:, :k])
    return cat.kl_div(*bucket_logprobs(student_logits_CV, top, spec.temperature, "renormalize"))


def _on_buckets(divergence: Callable[..., torch.Tensor], *hyper: str):
    """A KD loss applying divergence(lq_CB, ls_CB, *spec.<hyper>) to the bucketed pair."""

    def loss(student_logits_CV, teacher: TeacherRecord, spec: KDSpec) -> torch.Tensor:
        buckets = bucket_logprobs(student_logits_CV, teacher, spec.temperature, spec.missing_mass)
        return divergence(*buckets, *(getattr(spec, h) for h in hyper))

    loss.__name__, loss.__doc__ = divergence.__name__, divergence.__doc__
    return loss


def nkd(student_logits_CV, teacher: TeacherRecord, spec: KDSpec) -> torch.Tensor:
    """NKD with the teacher's argmax as target: target term at tau = 1, non-target at tau."""
    tau = spec.temperature
    at_1 = bucket_logprobs(student_logits_CV, teacher, 1.0, spec.missing_mass)
    at_tau = at_1 if tau == 1.0 else bucket_logprobs(student_logits_CV, teacher, tau, spec.missing_mass)
    return cat.nkd(*at_1, *at_tau, spec.nkd_gamma, tau)


def normkd(student_logits_CV, teacher: TeacherRecord, spec: KDSpec) -> torch.Tensor:
    """NormKD: per-token temperatures T_norm * std over the cached ids (spec.temperature is
    T_norm), each side's tau = 1 buckets tempered by its own temperature (a per-token tau is
    never cached); returns KL * sigma_T^2 so that the caller's T_norm^2 makes it KL * T_T^2."""
    s_CV = _fp32(student_logits_CV)
    s_CK = s_CV.gather(-1, teacher.topk_ids)
    t_teacher_C, t_student_C = cat.normkd_temperatures(_fp32(teacher.topk_logprobs), s_CK, spec.temperature)
    lq_CB, ls_CB = bucket_logprobs(s_CV, teacher, 1.0, spec.missing_mass)
    kl_C = cat.kl_div(temper(lq_CB, t_teacher_C[:, None]), temper(ls_CB, t_student_C[:, None]))
    return kl_C * (t_teacher_C / spec.temperature) ** 2


def bild(student_logits_CV, teacher: TeacherRecord, spec: KDSpec) -> torch.Tensor:
    """BiLD over k = min(bild_top_k, K); ignores missing_mass (uses the tail only as the
    fallback for the student's top-k ids the cache lacks)."""
    lq_CK, log_tail_C = teacher_logprobs(teacher, 1.0, "tail_bucket")
    k = min(spec.bild_top_k, lq_CK.shape[-1])
    return cat.bild(_fp32(student_logits_CV), teacher.topk_ids, lq_CK, log_tail_C, k, spec.temperature)


KD_LOSSES: dict[str, Callable[[torch.Tensor, TeacherRecord, KDSpec], torch.Tensor]] = {
    "forward_kl": forward_kl,
    "sampled": sampled,
    "reverse_kl": reverse_kl,
    "top_kl": top_kl,
    "jsd": _on_buckets(cat.jsd, "jsd_beta"),
    "skew_forward_kl": _on_buckets(cat.skew_forward_kl, "skew_alpha"),
    "skew_reverse_kl": _on_buckets(cat.skew_reverse_kl, "skew_alpha"),
    "tvd": _on_buckets(cat.tvd),
    "dkd": _on_buckets(cat.dkd, "dkd_alpha", "dkd_beta"),
    "nkd": nkd,
    "normkd": normkd,
    "bild": bild,
}


NO_TAU_SQUARED = frozenset({"bild"})  # BiLD's paper applies no tau^2 to its loss


def kd_weight(name: str, tau: float) -> float:
    """The trainer's factor on the KD term besides alpha: tau^2 (Hinton's gradient scale), 1 for bild."""
    return 1.0 if name in NO_TAU_SQUARED else tau**2


EXACT_AT_ANY_TAU = frozenset({"sampled", "top_kl", "bild"})  # never temper the tail bucket at tau != 1


def approximates_tail(spec: KDSpec, temperatures: tuple[float, ...], k: int, vocab_size: int) -> bool:
    """True if spec's loss on this cache would use the one-token tail (_tail_as_one_logit).

    That is: tail_bucket, a cache that does not hold the whole vocabulary, and a temperature the
    cache lacks; normkd's per-token temperatures (T_norm * sigma) are never cached.
    """
    if spec.missing_mass != "tail_bucket" or k >= vocab_size or spec.name in EXACT_AT_ANY_TAU:
        return False
    return spec.name == "normkd" or _cached_index(temperatures, spec.temperature) is None


def kd_per_token(student_logits_CV: torch.Tensor, teacher: TeacherRecord, spec: KDSpec) -> torch.Tensor:
    """Per-token KD loss [C] of spec.name (not multiplied by tau^2)."""
    loss = KD_LOSSES.get(spec.name)
    if loss is None:
        raise ValueError(f"unknown KD loss {spec.name!r}; choose one of {sorted(KD_LOSSES)}")
    return loss(student_logits_CV, teacher, spec)


# --- CE + KD over the LM head, chunked over tokens -----------------------------------------


def _chunk_losses(hidden_CH, weight_VH, labels_C, ce_mask_C, kd_mask_C, teacher, spec):
    """(CE sum, KD sum) of one chunk; its fp32 logits live only inside this call.

    Autocast is left here: under it (the trainer's bf16 mixed precision) a matmul of fp32
    inputs is still computed in bf16, which puts CE off by ~1e-2 nats/token. checkpoint replays
    the autocast state of the forward, so the recompute in backward is fp32 too.
    """
    with torch.autocast(hidden_CH.device.type, enabled=False):
        return _chunk_losses_fp32(hidden_CH, weight_VH, labels_C, ce_mask_C, kd_mask_C, teacher, spec)


def _chunk_losses_fp32(hidden_CH, weight_VH, labels_C, ce_mask_C, kd_mask_C, teacher, spec):
    logits_CV = _fp32(hidden_CH) @ _fp32(weight_VH).T
    safe_labels_C = torch.where(ce_mask_C, labels_C, torch.zeros_like(labels_C))
    ce_C = torch.logsumexp(logits_CV, -1) - logits_CV.gather(-1, safe_labels_C[:, None])[:, 0]
    ce = torch.where(ce_mask_C, ce_C, torch.zeros_like(ce_C)).sum()
    if teacher is None:
        return ce, torch.zeros_like(ce)
    # Only masked-in rows reach the KD loss: padding rows of the cache may hold anything.
    rows_R = kd_mask_C.nonzero()[:, 0]
    kd = kd_per_token(logits_CV.index_select(0, rows_R), take_rows(teacher, rows_R), spec).sum()
    return ce, kd


def chunked_lm_losses(
    hidden_TH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    labels_T: torch.Tensor,
    ce_mask_T: torch.Tensor,
    kd_mask_T: torch.Tensor,
    teacher: TeacherRecord | None,
    spec: KDSpec | None,
    chunk_tokens: int = 1024,
    vocab_limit: int = 0,
) -> dict[str, torch.Tensor]:
    """{"ce": sum of token CE over ce_mask, "kd": sum of kd_per_token over kd_mask}, fp32.

    Logits are computed in fp32 for chunk_tokens rows at a time, each chunk under
    torch.utils.checkpoint, so backward recomputes them and no [T, V] fp32 tensor is ever
    held. vocab_limit > 0 drops the padded rows lm_head_weight_VH[vocab_limit:] from both
    softmaxes. All-masked (or empty) input gives exactly 0 with zero gradients.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if vocab_limit:
        if not 0 < vocab_limit <= lm_head_weight_VH.shape[0]:
            raise ValueError(f"vocab_limit={vocab_limit} outside 1..{lm_head_weight_VH.shape[0]}")
        lm_head_weight_VH = lm_head_weight_VH[:vocab_limit]
    if teacher is not None:
        teacher, spec = lm_targets(teacher), spec or KDSpec()
    ce_mask_T, kd_mask_T = ce_mask_T.bool(), kd_mask_T.bool()
    # Empty sums: exactly 0, but attached to both inputs, so backward works and gives zeros.
    zero = _fp32(hidden_TH[:0]).sum() + _fp32(lm_head_weight_VH[:0]).sum()
    ce, kd = zero, zero
    for start in range(0, hidden_TH.shape[0], chunk_tokens):
        stop = min(start + chunk_tokens, hidden_TH.shape[0])
        chunk = slice(start, stop)
        ce_c, kd_c = checkpoint(
            _chunk_losses,
            hidden_TH[chunk],
            lm_head_weight_VH,
            labels_T[chunk],
            ce_mask_T[chunk],
            kd_mask_T[chunk],
            None if teacher is None else take_span(teacher, start, stop),
            spec,
            use_reentrant=False,
        )
        ce, kd = ce + ce_c, kd + kd_c
    return {"ce": ce, "kd": kd}
