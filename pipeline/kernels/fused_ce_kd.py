"""Phase two's fused LM head + CE + KD as two Triton sweeps over vocabulary tiles (docs/kernels.md).

The chunk function here replaces pipeline/fused_loss.py's torch ``_chunk`` (same arguments, same
result: ce sum, kd sum, dH; dW accumulated), selected by ``train.fused_loss=triton``. Per chunk of
C token rows:

1. ``_stats_kernel`` (grid: row blocks of BM): per vocabulary tile [BM, BV] it computes the logits
   ``h @ W^T`` with ``tl.dot`` (fp32 accumulation), never storing them, and keeps an online
   logsumexp of the *uncached* logits at tau = 1 and at the KD term's tail temperature (one
   running max, two rescaled sums). The ids the loss needs individually -- the cached top-k
   (excluded from the tail), the draws, the label -- come sorted by id per row (the "gather
   list"); a per-row pointer walks it as the tiles advance, so each tile tests only the ids that
   fall inside it (on average far below one per row and tile) instead of all K + D + 1. Their
   logits are stored as the walk meets them.
2. The small losses: ``fused_loss.loss_and_grads`` (passed in, ``Surrogate``) on the [C, K + 1]
   surrogate (the KD catalogue, unchanged, under autograd) gives the gradient w.r.t. each gathered
   logit and each tail logit.
3. ``_grad_kernel`` (grid: row blocks x vocabulary tiles, all independent): recomputes the logits
   tile and writes d logits = g_u1 exp(s - m) / sum1 + g_ut exp((s - m) / tau) / sumt at uncached
   ids, plus the gathered ids' gradients, into one [C, V] fp32 buffer; dH = d @ W and dW += d^T h
   are cuBLAS matmuls on it.

Two sweeps, not one: every gradient entry needs its row's final logsumexp, known only after the
last tile; the second sweep recomputes each logits tile (one more matmul) rather than storing the
[C, V] logits, so the only [C, V] tensor is the d buffer, written once. A single-pass variant
would hold the logits (no saving over the torch path's buffer) or add atomics for dW.

Matmul precision: fp32 inputs use IEEE fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32``
is set (then TF32, as cuBLAS would); bf16/fp16 hidden states (the body under autocast) make the
dots take bf16/fp16 inputs with fp32 accumulation. Under TRITON_INTERPRET=1 half-precision dots
are upcast to fp32 first (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl

from pipeline.kernels import interpreting, unavailable

BIG_ID = tl.constexpr(2**31 - 1)  # past every vocabulary id: the end of a row's gather list
GPU_TILES = (64, 128, 64)  # BM rows, BV vocabulary columns, BK hidden columns per dot step (not tuned)
GPU_WARPS = 8  # with GPU_TILES: no register spills for sm_90 (ptxas, bf16 dots; tests/test_triton_compile.py)
INTERPRET_TILES = (16, 64, 32)  # the interpreter runs one program at a time: few, small programs


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                 BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """[BM, BV] fp32 logits h[rows] @ W[cols]^T; rows/columns outside give 0."""
    acc = tl.zeros((BM, BV), dtype=tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0)  # int64: V x H may pass 2^31 elements
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _stats_kernel(h_ptr, w_ptr, gid_ptr, gflag_ptr, gval_ptr, m_ptr, sum1_ptr, sumt_ptr,
                  C, V, H, G, stride_h, stride_w, tau,
                  BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, HAS_T: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < C
    m = tl.full((BM,), float("-inf"), tl.float32)
    sum1 = tl.zeros((BM,), tl.float32)
    sumt = tl.zeros((BM,), tl.float32)
    ptr = tl.zeros((BM,), tl.int32)
    nxt = tl.load(gid_ptr + rows * G + ptr, mask=row_ok & (ptr < G), other=BIG_ID)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        col_ok = cols < V
        s = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, BM, BV, BK,
                         PRECISION, UPCAST)
        cached = tl.zeros((BM, BV), tl.int32)
        hi = v0 + BV
        while tl.max((nxt < hi).to(tl.int32), axis=0) > 0:  # some row's next gathered id lies in this tile
            hit = nxt < hi
            eq = (cols[None, :] == nxt[:, None]) & hit[:, None]
            tl.store(gval_ptr + rows * G + ptr, tl.sum(tl.where(eq, s, 0.0), axis=1), mask=hit)
            flag = tl.load(gflag_ptr + rows * G + ptr, mask=hit, other=0)
            cached = tl.where(eq & (flag[:, None] != 0), 1, cached)
            ptr = ptr + hit.to(tl.int32)
            nxt = tl.load(gid_ptr + rows * G + ptr, mask=row_ok & (ptr < G), other=BIG_ID)
        tail = row_ok[:, None] & col_ok[None, :] & (cached == 0)
        m_new = tl.maximum(m, tl.max(tl.where(tail, s, float("-inf")), axis=1))
        ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row with no tail yet: any finite shift
        sum1 = sum1 * tl.exp(m - ref) + tl.sum(tl.where(tail, tl.exp(s - ref[:, None]), 0.0), axis=1)
        if HAS_T:
            sumt = sumt * tl.exp((m - ref) / tau) + tl.sum(tl.where(tail, tl.exp((s - ref[:, None]) / tau), 0.0), axis=1)
        m = m_new
    tl.store(m_ptr + rows, tl.where(m > float("-inf"), m, 0.0), mask=row_ok)
    tl.store(sum1_ptr + rows, sum1, mask=row_ok)
    tl.store(sumt_ptr + rows, sumt, mask=row_ok)


@triton.jit
def _grad_kernel(h_ptr, w_ptr, gid_ptr, gflag_ptr, gcoef_ptr, m_ptr, r1_ptr, rt_ptr, d_ptr,
                 C, V, H, G, stride_h, stride_w, stride_d, tau,
                 BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, HAS_T: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    v0 = tl.program_id(1) * BV
    cols = v0 + tl.arange(0, BV)
    row_ok = rows < C
    col_ok = cols < V
    s = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, BM, BV, BK,
                     PRECISION, UPCAST)
    ptr = tl.zeros((BM,), tl.int32)  # where this tile's ids start in each row's sorted list
    for g0 in range(0, G, 16):  # in steps of 16 ids: a [BM, G] block would cost registers the tile needs
        gs = g0 + tl.arange(0, 16)
        ids = tl.load(gid_ptr + rows[:, None] * G + gs[None, :], mask=row_ok[:, None] & (gs[None, :] < G),
                      other=BIG_ID)
        ptr += tl.sum((ids < v0).to(tl.int32), axis=1)
    nxt = tl.load(gid_ptr + rows * G + ptr, mask=row_ok & (ptr < G), other=BIG_ID)
    sparse = tl.zeros((BM, BV), tl.float32)
    cached = tl.zeros((BM, BV), tl.int32)
    hi = v0 + BV
    while tl.max((nxt < hi).to(tl.int32), axis=0) > 0:
        hit = nxt < hi
        eq = (cols[None, :] == nxt[:, None]) & hit[:, None]
        coef = tl.load(gcoef_ptr + rows * G + ptr, mask=hit, other=0.0)
        sparse += tl.where(eq, coef[:, None], 0.0)  # repeated ids (draws) add up, as scatter_add does
        flag = tl.load(gflag_ptr + rows * G + ptr, mask=hit, other=0)
        cached = tl.where(eq & (flag[:, None] != 0), 1, cached)
        ptr = ptr + hit.to(tl.int32)
        nxt = tl.load(gid_ptr + rows * G + ptr, mask=row_ok & (ptr < G), other=BIG_ID)
    m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
    e = s - m[:, None]
    dense = tl.load(r1_ptr + rows, mask=row_ok, other=0.0)[:, None] * tl.exp(e)
    if HAS_T:
        dense += tl.load(rt_ptr + rows, mask=row_ok, other=0.0)[:, None] * tl.exp(e / tau)
    tail = row_ok[:, None] & col_ok[None, :] & (cached == 0)
    d = tl.where(tail, dense, 0.0) + sparse
    tl.store(d_ptr + rows[:, None].to(tl.int64) * stride_d + cols[None, :], d, mask=row_ok[:, None] & col_ok[None, :])


def _precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input_precision: fp32 follows torch's TF32 switch (as cuBLAS would); half inputs need none."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not interpreting() else "ieee"


@dataclass(frozen=True)
class Surrogate:
    """pipeline/fused_loss.py's side of a chunk, which the torch chunk shares: passed in, so this
    module does not import fused_loss back (no import cycle)."""

    gathered_ids: Callable  # (teacher, plan, rows, device) -> (cached ids [C, K], draw ids [C, D] or None)
    other_tail: Callable  # (plan) -> whether the KD tail has its own temperature
    loss_and_grads: Callable  # the small losses on the surrogate and their gradients


class TritonChunk:
    """fused_loss._chunk's contract, computed by the two Triton sweeps.

    dot_dtype: the matmuls' input dtype (fp32, or the body's bf16/fp16 under autocast);
    w_dot_VH is the LM head in that dtype, made once per loss call, not once per chunk."""

    def __init__(self, w_VH: torch.Tensor, dot_dtype: torch.dtype, surrogate: Surrogate,
                 tiles: tuple[int, int, int] | None = None):
        self.surrogate = surrogate
        why = unavailable(w_VH.device)
        if why:
            raise ValueError(f"train.fused_loss=triton: {why}")
        self.dot_dtype = dot_dtype if dot_dtype in (torch.bfloat16, torch.float16) else torch.float32
        self.w_dot_VH = w_VH.to(self.dot_dtype).contiguous()
        self.tiles = tiles or (INTERPRET_TILES if interpreting() else GPU_TILES)
        if any(t < 16 or t & (t - 1) for t in self.tiles):
            raise ValueError(f"Triton tile sizes must be powers of two >= 16, got {self.tiles}")

    def __call__(self, h_CH, w_VH, dW_VH, labels_C, ce_C, kd_C, teacher, spec, plan, weights):
        if h_CH.dtype != torch.float32:
            raise ValueError(f"the Triton fused loss computes in fp32; got {h_CH.dtype} hidden states "
                             f"(use train.fused_loss=always for float64)")
        C, V, H = h_CH.shape[0], w_VH.shape[0], h_CH.shape[1]
        dev = h_CH.device
        y_C = torch.where(ce_C, labels_C, 0)
        ids_CK, draw_ids_CD = self.surrogate.gathered_ids(teacher, plan, C, dev)
        draws_CD = draw_ids_CD if draw_ids_CD is not None else torch.zeros(C, 0, dtype=torch.long, device=dev)
        K, D = ids_CK.shape[1], draws_CD.shape[1]
        # the gather list: cached ids (flag 1: not in the tail), draws, the label; sorted by id per row
        gid_CG, order_CG = torch.sort(torch.cat([ids_CK, draws_CD, y_C[:, None]], 1).to(torch.int32), dim=1, stable=True)
        flag_CG = (order_CG < K).to(torch.int32)
        G = gid_CG.shape[1]
        other = self.surrogate.other_tail(plan)
        tau = float(plan.tail_tau) if other else 1.0
        h_dot = h_CH.to(self.dot_dtype).contiguous()
        BM, BV, BK = self.tiles
        common = dict(BM=BM, BV=BV, BK=BK, HAS_T=other, PRECISION=_precision(self.dot_dtype),
                      UPCAST=interpreting() and self.dot_dtype != torch.float32, num_warps=GPU_WARPS)
        gval_CG = torch.zeros(C, G, device=dev)
        m_C, sum1_C, sumt_C = (torch.empty(C, device=dev) for _ in range(3))
        _stats_kernel[(triton.cdiv(C, BM),)](h_dot, self.w_dot_VH, gid_CG, flag_CG, gval_CG, m_C, sum1_C, sumt_C,
                                            C, V, H, G, h_dot.stride(0), self.w_dot_VH.stride(0), tau, **common)
        g_CG = torch.empty_like(gval_CG).scatter_(1, order_CG, gval_CG)  # back to [cached | draws | label]
        a_CK, s_y_C = g_CG[:, :K], g_CG[:, -1]
        sd_CD = g_CG[:, K:K + D] if draw_ids_CD is not None else None
        u1_C = torch.where(sum1_C > 0, m_C + sum1_C.log(), float("-inf"))
        ut_C = torch.where(sumt_C > 0, m_C + tau * sumt_C.log(), float("-inf")) if other else None
        ce, kd, g_a, g_u1, g_ut, g_sd = self.surrogate.loss_and_grads(a_CK, u1_C, ut_C, sd_CD, s_y_C, ce_C, kd_C,
                                                                      teacher, spec, plan, weights, V)
        label_C1 = torch.where(ce_C, -weights[0], 0.0)[:, None].to(g_a.dtype)
        coef_CG = torch.cat([g_a, g_sd if g_sd is not None else draws_CD.new_zeros(C, 0, dtype=g_a.dtype), label_C1], 1)
        coef_CG = coef_CG.gather(1, order_CG.long()).contiguous()
        tiny = torch.finfo(torch.float32).tiny
        r1_C = g_u1 / sum1_C.clamp_min(tiny)
        rt_C = g_ut / sumt_C.clamp_min(tiny) if other else r1_C
        d_CV = torch.empty(C, V, device=dev)
        grid = (triton.cdiv(C, BM), triton.cdiv(V, BV))
        _grad_kernel[grid](h_dot, self.w_dot_VH, gid_CG, flag_CG, coef_CG, m_C, r1_C.contiguous(), rt_C.contiguous(),
                           d_CV, C, V, H, G, h_dot.stride(0), self.w_dot_VH.stride(0), d_CV.stride(0), tau,
                           **common)
        dW_VH.addmm_(d_CV.T, h_CH)
        return ce, kd, d_CV @ w_VH
