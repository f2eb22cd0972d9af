"""Fused LM head + CE + KD (issue 13): per chunk of tokens one pass computes the fp32 logits,
the CE and KD sums, and their gradients w.r.t. the hidden states and the LM-head weight;
backward only scales what forward saved. No recompute, no [T, V] tensor.

Shape legend as pipeline/losses.py (T, C, V, H, K, D), plus
  S  surrogate columns: the K cached ids' logits and, with a tail bucket, one tail logit

How the KD catalogue is reused unchanged: every covered top-k loss sees the student only through
its logits at the teacher's K cached ids and the log-mass of the other ids at ONE temperature
tau0 (tau if cached, else 1, where losses.bucket_logprobs tempers the tau = 1 buckets). A
[C, K + 1] surrogate row -- those K logits and one tail logit u = tau0 * log sum_{v not cached}
exp(s_v / tau0) -- has exactly the same buckets at tau0, so KD_LOSSES[name] runs on it (with
ids 0..K-1; nkd, which looks at tau = 1 and at tau, gets one surrogate per temperature) under
autograd on [C, K + 1] only, and the gradient goes back to the vocabulary in closed form:
ds_v = g_u * exp(s_v / tau0) / sum_tail exp(s / tau0) for uncached v, g_k at id_k.
CE is the same map with the tail at tau = 1 (ids empty: the tail is the whole vocabulary).
Sampled targets are -sum_d w_d (s_d - u_tau) / tau, u_tau over the whole vocabulary.

The gradients are formed in forward for the weights (w_ce, w_kd) the trainer applies; backward
accepts grad outputs proportional to them (the trainer's loss * scale) and refuses others.
Formulas and what is covered: docs/losses.md, "Fused LM head + CE + KD".
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass, replace

import torch

from pipeline import kd_catalogue as cat
from pipeline.losses import (
    KD_LOSSES,
    KDSpec,
    TeacherRecord,
    draw_weights,
    lm_targets,
    take_span,
    _cached_index,
    bucket_logprobs,
)

FUSED_LOSS = ("auto", "always", "never", "triton")  # not on/off: YAML reads those as booleans
KERNELS = ("torch", "triton")  # how a chunk is computed (fused_lm_losses)
RENORMALISED = frozenset({"top_kl"})  # never looks at the tail bucket


@dataclass(frozen=True)
class Plan:
    """What the chunk pass computes besides CE: the KD kind and the temperature of its tail column."""

    kd: str  # "none" | "topk" | "sampled"
    tail_tau: float | None  # None: no tail column (renormalised top-k)


def not_covered(spec: KDSpec) -> str:
    """Why the fused path cannot compute spec's loss ("" when it can)."""
    if spec.name == "bild":
        return "bild ranks the student's own top-k over the whole vocabulary"
    return ""


def make_plan(spec: KDSpec | None, temperatures: tuple[float, ...]) -> Plan:
    if spec is None:
        return Plan("none", None)
    if spec.name == "sampled":
        return Plan("sampled", spec.temperature)
    assert not not_covered(spec), not_covered(spec)
    if spec.missing_mass == "renormalize" or spec.name in RENORMALISED:
        return Plan("topk", None)
    cached = _cached_index(temperatures, spec.temperature) is not None and spec.name != "normkd"
    return Plan("topk", spec.temperature if cached else 1.0)


# --- one chunk ------------------------------------------------------------------------------


def _safe_teacher(teacher: TeacherRecord, kd_C: torch.Tensor, plan: Plan) -> TeacherRecord:
    """Rows outside kd_C replaced by harmless values (unique ids 0..K-1, a flat top-k, no draws):
    padding rows of a cache may hold anything, and a NaN there would reach the gradient through
    the masked sum (0 * NaN). Masks instead of index_select: no host sync."""
    row_C1 = kd_C[:, None]
    if plan.kd == "sampled":
        if teacher.draw_ids is None:
            raise ValueError("the 'sampled' KD loss needs a cache with draws (draw_ids, draw_counts)")
        logprobs = None if teacher.draw_logprobs is None else torch.where(row_C1, teacher.draw_logprobs, 0.0)
        return replace(teacher, draw_ids=torch.where(row_C1, teacher.draw_ids, 0),
                       draw_counts=torch.where(row_C1, teacher.draw_counts, 0), draw_logprobs=logprobs)
    if teacher.topk_ids is None or teacher.topk_logprobs is None:
        raise ValueError("this cache holds no teacher top-k; use the 'sampled' KD loss")
    K = teacher.topk_ids.shape[-1]
    ids_CK = torch.where(row_C1, teacher.topk_ids, torch.arange(K, device=kd_C.device))
    lp_CK = torch.where(row_C1, teacher.topk_logprobs, -math.log(2 * K))
    logz_CP = torch.where(row_C1, teacher.log_partition, 0.0)
    return replace(teacher, topk_ids=ids_CK, topk_logprobs=lp_CK, log_partition=logz_CP)


def _tail_logit(s_CV: torch.Tensor, m_C: torch.Tensor, tau: float, in_place: bool):
    """(u_C = tau * log sum_v exp(s_v / tau) over the finite s_CV, e_CV = exp((s - m) / tau), sum_C).

    s_CV holds -inf at the cached ids, so e_CV is exactly 0 there. m_C is the row max of s_CV.
    """
    e_CV = s_CV.sub_(m_C[:, None]) if in_place else s_CV - m_C[:, None]
    if tau != 1.0:
        e_CV.div_(tau)
    e_CV.exp_()
    sum_C = e_CV.sum(-1)
    u_C = torch.where(sum_C > 0, m_C + tau * sum_C.log(), float("-inf"))
    return u_C, e_CV, sum_C


def _small_losses(a_CK, u1_C, ut_C, s_y_C, sd_CD, ce_C, kd_C, teacher, spec, plan, vocab):
    """Per-row CE and KD from the surrogate statistics (the leaves autograd differentiates)."""
    ce_row = torch.logsumexp(torch.cat([a_CK, u1_C[:, None]], -1), -1) - s_y_C
    ce = torch.where(ce_C, ce_row, 0.0).sum()
    if plan.kd == "none":
        return ce, torch.zeros_like(ce)
    if plan.kd == "sampled":
        w_CD = draw_weights(teacher, spec.temperature).to(sd_CD.dtype)
        kd_row = -(w_CD * (sd_CD - ut_C[:, None])).sum(-1) / spec.temperature
    else:
        K = a_CK.shape[-1]
        tail = plan.tail_tau is not None and K < vocab  # a cache of the whole vocabulary has no tail
        ids_CK = torch.arange(K, device=a_CK.device).expand(a_CK.shape[0], K)
        surrogate = lambda u_C: torch.cat([a_CK, u_C[:, None]], -1) if tail else a_CK
        teacher = replace(teacher, topk_ids=ids_CK)
        if spec.name == "nkd":  # its target half at tau = 1, the other at tau: two tails (u1; ut at tail_tau)
            at_1 = bucket_logprobs(surrogate(u1_C), teacher, 1.0, spec.missing_mass)
            at_tau = bucket_logprobs(surrogate(ut_C), teacher, spec.temperature, spec.missing_mass)
            kd_row = cat.nkd(*at_1, *at_tau, spec.nkd_gamma, spec.temperature)
        else:
            kd_row = KD_LOSSES[spec.name](surrogate(ut_C), teacher, spec)
    return ce, torch.where(kd_C, kd_row, 0.0).sum()


def loss_and_grads(a_CK, u1_C, ut_C, sd_CD, s_y_C, ce_C, kd_C, teacher, spec, plan, weights, vocab):
    """(ce sum, kd sum, g_a_CK, g_u1_C, g_ut_C, g_sd_CD): the chunk's sums and the gradient of
    weights[0] * ce + weights[1] * kd w.r.t. the surrogate statistics (ut_C, sd_CD may be None:
    then so are their gradients). Shared by the torch chunk below and the Triton one
    (pipeline/kernels/fused_ce_kd.py), which differ only in how the statistics are formed."""
    leaves = [a_CK, u1_C] + ([ut_C] if ut_C is not None else []) + ([sd_CD] if sd_CD is not None else [])
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in leaves]
        a, u1 = leaves[:2]
        ut = leaves[2] if ut_C is not None else u1
        sd = leaves[-1] if sd_CD is not None else None
        ce, kd = _small_losses(a, u1, ut, s_y_C, sd, ce_C, kd_C, teacher, spec, plan, vocab)
        total = weights[0] * ce + weights[1] * kd
        grads = torch.autograd.grad(total, leaves, allow_unused=True) if total.requires_grad else [None] * len(leaves)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    g_ut = grads[2] if ut_C is not None else None
    return ce.detach(), kd.detach(), grads[0], grads[1], g_ut, grads[-1] if sd_CD is not None else None


def gathered_ids(teacher, plan: Plan, rows: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids_CK the tail excludes: the cached top-k or none, the draws' ids or None) of a chunk."""
    ids_CK = teacher.topk_ids if plan.kd == "topk" else torch.zeros(rows, 0, dtype=torch.long, device=device)
    return ids_CK, teacher.draw_ids if plan.kd == "sampled" else None


def other_tail(plan: Plan) -> bool:
    """True when the KD term needs a second tail logit, at plan.tail_tau != 1."""
    return plan.tail_tau is not None and plan.tail_tau != 1.0


def _chunk(h_CH, w_VH, dW_VH, labels_C, ce_C, kd_C, teacher, spec, plan, weights):
    """(ce sum, kd sum, dH_CH) of one chunk; adds the chunk's d weight into dW_VH."""
    s_CV = h_CH @ w_VH.T
    C, V = s_CV.shape
    y_C = torch.where(ce_C, labels_C, 0)
    s_y_C = s_CV.gather(-1, y_C[:, None])[:, 0]
    ids_CK, draw_ids_CD = gathered_ids(teacher, plan, C, s_CV.device)
    a_CK = s_CV.gather(-1, ids_CK)
    sd_CD = None if draw_ids_CD is None else s_CV.gather(-1, draw_ids_CD)
    s_CV.scatter_(-1, ids_CK, float("-inf"))  # the uncached logits
    m_C = s_CV.amax(-1)
    m_C = torch.where(torch.isfinite(m_C), m_C, 0.0)  # every id cached (K = V): no tail
    other = other_tail(plan)
    ut_C, et_CV, sumt_C = _tail_logit(s_CV, m_C, plan.tail_tau, in_place=False) if other else (None,) * 3
    u1_C, e1_CV, sum1_C = _tail_logit(s_CV, m_C, 1.0, in_place=True)
    ce, kd, g_a, g_u1, g_ut, g_sd = loss_and_grads(a_CK, u1_C, ut_C, sd_CD, s_y_C, ce_C, kd_C, teacher, spec, plan,
                                                   weights, V)
    tiny = torch.finfo(s_CV.dtype).tiny
    d_CV = e1_CV.mul_((g_u1 / sum1_C.clamp_min(tiny))[:, None])  # in place: s_CV -> e1 -> d logits
    if other:
        d_CV.add_(et_CV.mul_((g_ut / sumt_C.clamp_min(tiny))[:, None]))
        del et_CV
    d_CV.scatter_add_(-1, ids_CK, g_a)  # 0 at the cached ids so far
    d_CV.scatter_add_(-1, y_C[:, None], torch.where(ce_C, -weights[0], 0.0).to(d_CV.dtype)[:, None])
    if sd_CD is not None:
        d_CV.scatter_add_(-1, draw_ids_CD, g_sd)
    dW_VH.addmm_(d_CV.T, h_CH)
    return ce, kd, d_CV @ w_VH


def _triton_chunk(w_VH: torch.Tensor, hidden_dtype: torch.dtype):
    from pipeline.kernels.fused_ce_kd import Surrogate, TritonChunk  # imports triton: only when selected

    return TritonChunk(w_VH, hidden_dtype, Surrogate(gathered_ids, other_tail, loss_and_grads))


# --- the autograd Function --------------------------------------------------------------------


class FusedLMLoss(torch.autograd.Function):
    """(ce sum, kd sum) with d hidden and d weight formed in forward for the given weights."""

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, labels_T, ce_mask_T, kd_mask_T, teacher, spec, plan, weights,
                chunk_tokens, vocab_limit, kernel):
        dtype = torch.float64 if hidden_TH.dtype == torch.float64 else torch.float32
        with torch.autocast(hidden_TH.device.type, enabled=False), torch.no_grad():
            w_VH = weight_VH[:vocab_limit].to(dtype)
            chunk = _chunk if kernel == "torch" else _triton_chunk(w_VH, hidden_TH.dtype)
            dW_VH = torch.zeros(weight_VH.shape, dtype=dtype, device=weight_VH.device)
            dH_TH = torch.empty(hidden_TH.shape, dtype=dtype, device=hidden_TH.device)
            ce, kd = (torch.zeros((), dtype=dtype, device=hidden_TH.device) for _ in range(2))  # two outputs
            for start in range(0, hidden_TH.shape[0], chunk_tokens):
                rows = slice(start, min(start + chunk_tokens, hidden_TH.shape[0]))
                t = None if teacher is None else _safe_teacher(take_span(teacher, rows.start, rows.stop),
                                                               kd_mask_T[rows], plan)
                ce_c, kd_c, dH_TH[rows] = chunk(hidden_TH[rows].to(dtype), w_VH, dW_VH[:vocab_limit], labels_T[rows],
                                                 ce_mask_T[rows], kd_mask_T[rows], t, spec, plan, weights)
                ce, kd = ce + ce_c, kd + kd_c
        ctx.save_for_backward(dH_TH, dW_VH)
        ctx.weights, ctx.dtypes, ctx.done = weights, (hidden_TH.dtype, weight_VH.dtype), False
        return ce, kd

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        if ctx.done:
            raise RuntimeError("the fused LM loss can be differentiated once (it scales its saved gradients in place)")
        ctx.done = True
        dH_TH, dW_VH = ctx.saved_tensors
        c = _common_factor(g_ce, g_kd, ctx.weights)
        return (dH_TH.mul_(c).to(ctx.dtypes[0]), dW_VH.mul_(c).to(ctx.dtypes[1])) + (None,) * 10


def _common_factor(g_ce, g_kd, weights) -> torch.Tensor:
    """c with (g_ce, g_kd) = c * weights. Grad outputs the forward did not prepare for raise on
    CPU and poison the gradient with NaN elsewhere (a check there would stall the host)."""
    w_ce, w_kd = weights
    device = (g_ce if g_ce is not None else g_kd).device
    g = torch.stack([torch.zeros((), device=device) if x is None else x.detach().reshape(()) for x in (g_ce, g_kd)])
    g = g.to(torch.float64)
    c = (g[0] * w_ce + g[1] * w_kd) / (w_ce * w_ce + w_kd * w_kd)  # python floats: no host-to-device copy
    ok = torch.maximum((g[0] - c * w_ce).abs(), (g[1] - c * w_kd).abs()) <= 1e-6 * g.abs().max().clamp_min(1e-30)
    if g.device.type == "cpu":
        if not bool(ok):
            raise RuntimeError(f"the fused LM loss prepared its gradient for (ce, kd) weights {tuple(weights)}; "
                               f"backward got grad outputs {g.tolist()}: pass the weights of the loss you "
                               f"differentiate, or use train.fused_loss=never")
        return c.float()
    return torch.where(ok, c, float("nan")).float()


def fused_lm_losses(hidden_TH, lm_head_weight_VH, labels_T, ce_mask_T, kd_mask_T, teacher: TeacherRecord | None,
                    spec: KDSpec | None, weights: tuple[float, float] = (1.0, 1.0), chunk_tokens: int = 1024,
                    vocab_limit: int = 0, kernel: str = "torch") -> dict[str, torch.Tensor]:
    """losses.chunked_lm_losses' contract ({"ce", "kd"} sums, fp32, vocab_limit, masks), fused.

    weights: the (ce, kd) factors of the loss that will be differentiated (its grad outputs may
    be any common multiple of them, e.g. the trainer's 1 / global token count).
    kernel: "torch" (the chunk below) or "triton" (pipeline/kernels/fused_ce_kd.py: the same
    statistics and gradients from two Triton sweeps over vocabulary tiles; CUDA, or CPU under
    TRITON_INTERPRET=1).
    """
    if kernel not in KERNELS:
        raise ValueError(f"fused_lm_losses: kernel={kernel!r}; allowed: {', '.join(KERNELS)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    vocab_limit = vocab_limit or lm_head_weight_VH.shape[0]
    if not 0 < vocab_limit <= lm_head_weight_VH.shape[0]:
        raise ValueError(f"vocab_limit={vocab_limit} outside 1..{lm_head_weight_VH.shape[0]}")
    if teacher is None:
        spec = None
    else:
        teacher, spec = lm_targets(teacher), spec or KDSpec()
    if spec is not None and not_covered(spec):
        raise ValueError(f"the fused LM loss does not cover {spec.name}: {not_covered(spec)}")
    if not any(weights):
        raise ValueError("fused_lm_losses: at least one of the (ce, kd) weights must be non-zero")
    plan = make_plan(spec, teacher.temperatures if teacher is not None else (1.0,))
    return dict(zip(("ce", "kd"), FusedLMLoss.apply(
        hidden_TH, lm_head_weight_VH, labels_T, ce_mask_T.bool(), kd_mask_T.bool(), teacher, spec, plan,
        tuple(float(w) for w in weights), chunk_tokens, vocab_limit, kernel)))


def choose(mode: str, spec: KDSpec | None) -> bool:
    """train.fused_loss: True for the fused path. 'auto' falls back (one stderr line) where it
    does not cover the loss, 'always' and 'triton' refuse such a loss, 'never' is the chunked path.
    'auto' keeps the torch kernel: no GPU measurement of the Triton one exists yet (docs/kernels.md)."""
    if mode not in FUSED_LOSS:
        raise ValueError(f"train.fused_loss={mode!r}; allowed: {', '.join(FUSED_LOSS)}")
    if mode == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError("train.fused_loss=triton: triton is not installed (pip install triton); "
                         "use train.fused_loss=auto")
    reason = "" if spec is None or mode == "never" else not_covered(spec)
    if reason and mode in ("always", "triton"):
        raise ValueError(f"train.fused_loss={mode} does not cover train.kd_loss={spec.name}: {reason}; "
                         f"use train.fused_loss=auto (falls back to the chunked loss) or never")
    if reason:
        print(f"train.fused_loss=auto: {spec.name} uses the chunked LM-head loss, not the fused one ({reason})",
              file=sys.stderr, flush=True)
    return mode != "never" and not reason


def kernel_for(mode: str) -> str:
    """The fused_lm_losses kernel train.fused_loss selects."""
    return "triton" if mode == "triton" else "torch"
