"""Phase one's extraction over rows of teacher logits in one Triton kernel (docs/kernels.md).

``extract_chunk`` gives the fields pipeline/teachers/extract.py's torch path gives for a chunk of
C positions (``cache.extract_kernel=triton``), reading the logits in their own dtype (bf16 on a
GPU: no fp32 copy of the chunk). One program per row, two sweeps over vocabulary tiles of BV:

1. online: the running max and, per cached temperature (and the draw temperature), the rescaled
   sum of exp((z - max) / t) -- the log-partitions; the target's logit; and the running top-k as
   int64 keys (order-preserving fp32 bits << 32 | (2^31 - 1 - id): one sort orders by value, ties
   to the lower id), kept as the best KP (k rounded up to a power of two). A tile where more than
   KP entries beat the current KP-th (the first tile or two) is sorted whole; in later tiles the
   few entries that beat it are compacted (a cumsum gives their slots) through a [KP] scratch row
   in global memory; either way the tile's best KP merge with the running best by ranks (a
   [2 KP, 2 KP] compare), and a tile where nothing beats the KP-th costs one compare per entry.
2. draws (only with sampled targets): inverse-CDF sampling with the uniforms sorted per row; the
   running cumulative sum of exp((z - max) / t_draw) meets them in order, so each tile resolves the
   uniforms that fall inside it (ids = the count of cumulative sums below u * total).

The uniforms are the torch path's own (``pipeline.seeding.sequence_generator(seed, sample id)``,
drawn on the host), so the draws are reproducible from (seed, sample id) on any rank and resume, and equal the
torch path's except where rounding puts a uniform on the other side of a boundary. The running
sums across tiles are fp64 (within a tile fp32). Against a float64 inverse CDF at V = 151,936 (3
rows of random logits, 192 draws), 3 draws land on a neighbouring id, where fp32 running sums moved
5. The torch path on CPU, whose cumsum accumulates in double, moved 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline.kernels import interpreting, next_pow2, unavailable
from pipeline.teachers.base import padded_draws

GPU_BLOCK = 1024  # vocabulary columns per tile (not tuned: no GPU measurement yet)
GPU_WARPS = 8  # at k = 64: 217 registers and no spills for sm_90 (4 warps spill; tests/test_triton_compile.py)
INTERPRET_BLOCK = 64
MIN_KEY = tl.constexpr(-(2**63))


@triton.jit
def _keys(z, cols):
    """int64 keys ordered as (z, -id): the fp32 bits made order-preserving as a signed int, id below."""
    bits = z.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)


@triton.jit
def _head(x, KP: tl.constexpr):
    """The first KP entries of a 1-D tensor whose length is a multiple of KP."""
    x2 = tl.reshape(x, (x.shape[0] // KP, KP))
    first = tl.arange(0, x.shape[0] // KP)[:, None] == 0
    return tl.sum(tl.where(first, x2, 0), axis=0)


@triton.jit
def _merge(top, best, KP: tl.constexpr):
    """The best KP of two [KP] key vectors, sorted descending, by ranks (keys are distinct: ids, and
    distinct sentinels): O(KP^2) compares, cheaper than a sort at these sizes."""
    both = tl.reshape(tl.join(top, best), (2 * KP,))
    rank = tl.sum((both[None, :] > both[:, None]).to(tl.int32), axis=1)  # how many keys beat each
    slots = tl.arange(0, KP)
    return tl.sum(tl.where(rank[None, :] == slots[:, None], both[None, :], 0), axis=1)


@triton.jit
def _extract_kernel(z_ptr, stride_z, V, inv_t_ptr, NT, tgt_ptr, u_ptr, N, DRAW_T,
                    lz_ptr, P, top_lp_ptr, top_id_ptr, K, scratch_ptr, tlp_ptr, draw_ptr,
                    BV: tl.constexpr, TP: tl.constexpr, KP: tl.constexpr,
                    HAS_TOPK: tl.constexpr, HAS_DRAWS: tl.constexpr):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    ts = tl.arange(0, TP)
    inv_t = tl.load(inv_t_ptr + ts, mask=ts < NT, other=1.0)
    m = tl.max(tl.full((BV,), float("-inf"), tl.float32), axis=0)
    sums = tl.zeros((TP,), tl.float64)  # fp64 across tiles: the draws' CDF resolves 1/V-sized steps at V = 152k
    tgt = tl.load(tgt_ptr + row)
    z_tgt = tl.sum(tl.zeros((BV,), tl.float32), axis=0)
    ks = tl.arange(0, KP)
    top = tl.full((KP,), MIN_KEY, tl.int64) + ks  # distinct sentinels, below every real key (-inf included)
    scratch = scratch_ptr + row.to(tl.int64) * KP
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        tile = tl.sum(tl.exp((z[None, :] - ref) * inv_t[:, None]), axis=1)
        sums = sums * tl.exp((m - ref) * inv_t).to(tl.float64) + tile.to(tl.float64)
        m = m_new
        z_tgt += tl.sum(tl.where(cols == tgt, z, 0.0), axis=0)
        if HAS_TOPK:
            keys = _keys(z, cols)
            beats = keys > tl.min(top, axis=0)  # entries better than the current KP-th
            count = tl.sum(beats.to(tl.int32), axis=0)
            if count > KP:  # the first tile or two: sort the whole tile
                top = _merge(top, _head(tl.sort(keys, descending=True), KP), KP)
            elif count > 0:  # later tiles: compact the few candidates through the row's scratch
                slot = tl.cumsum(beats.to(tl.int32), axis=0) - 1
                tl.store(scratch + ks, tl.full((KP,), MIN_KEY, tl.int64) + KP + ks)  # distinct sentinels for the empty slots
                tl.debug_barrier()
                tl.store(scratch + slot, keys, mask=beats)
                tl.debug_barrier()
                best = tl.load(scratch + ks)
                tl.debug_barrier()  # every thread read the scratch before the next tile writes it
                top = _merge(top, best, KP)
    m = tl.where((m > float("-inf")) & (m < float("inf")), m, 0.0)
    # log sum exp(z / t) = log sum exp((z - m) / t) + m / t; the log in fp32 (no libdevice fp64 call)
    lz = tl.log(sums.to(tl.float32)) + m * inv_t
    tl.store(lz_ptr + row * P + ts, lz, mask=ts < P)
    lz1 = tl.sum(tl.where(ts == 0, lz, 0.0), axis=0)
    tl.store(tlp_ptr + row, tl.where(tgt >= 0, z_tgt - lz1, 0.0))
    if HAS_TOPK:
        ordered = (top >> 32).to(tl.int32)
        vals = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
        ids = 0x7FFFFFFF - (top & 0xFFFFFFFF).to(tl.int32)
        tl.store(top_lp_ptr + row * K + ks, vals - lz1, mask=ks < K)
        tl.store(top_id_ptr + row * K + ks, ids, mask=ks < K)
    if HAS_DRAWS:
        inv_td = tl.sum(tl.where(ts == DRAW_T, inv_t, 0.0), axis=0)
        total = tl.sum(tl.where(ts == DRAW_T, sums, 0.0), axis=0)
        base = tl.sum(tl.zeros((BV,), tl.float64), axis=0)
        n = 0
        nxt = tl.load(u_ptr + row * N).to(tl.float64) * total
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            cum = tl.cumsum(tl.exp((z - m) * inv_td), axis=0).to(tl.float64) + base  # tile in fp32, offset fp64
            hi = tl.max(cum, axis=0)
            while (n < N) & (nxt < hi):
                idx = v0 + tl.sum((cum < nxt).to(tl.int32), axis=0)
                tl.store(draw_ptr + row * N + n, tl.minimum(idx, V - 1))
                n += 1
                nxt = tl.load(u_ptr + row * N + n, mask=n < N, other=2.0).to(tl.float64) * total
            base = hi
        while n < N:  # u * total at or past the rounded total: the last id, as searchsorted + clamp
            tl.store(draw_ptr + row * N + n, V - 1)
            n += 1


def check(z_CV: torch.Tensor, k: int) -> None:
    why = unavailable(z_CV.device)
    if why:
        raise ValueError(f"cache.extract_kernel=triton: {why}")
    if z_CV.stride(-1) != 1 or z_CV.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton extraction needs fp32/bf16/fp16 logits with contiguous rows, got {z_CV.dtype}")
    if not 0 <= k <= z_CV.shape[1]:
        raise ValueError(f"k={k} must be in 0..{z_CV.shape[1]}")


def extract_chunk(z_CV: torch.Tensor, targets_C: torch.Tensor, u_CN: torch.Tensor | None, k: int,
                  temperatures: tuple[float, ...], draw_temperature: float, block: int = 0) -> dict[str, torch.Tensor]:
    """extract.py's fields for C rows of logits: log_partition [C, P], target_logprob [C], and
    topk_ids (int32) / topk_logprobs [C, k] when k > 0, draw_ids / draw_counts [C, N] when u_CN
    (the uniforms [C, N], any order) is given."""
    check(z_CV, k)
    C, V = z_CV.shape
    dev = z_CV.device
    temps = list(temperatures)
    draw_t = next((j for j, t in enumerate(temps) if t == draw_temperature), None)
    if u_CN is not None and draw_t is None:
        temps.append(draw_temperature)
        draw_t = len(temps) - 1
    P = len(temperatures)
    inv_t = torch.tensor([1.0 / t for t in temps], dtype=torch.float32, device=dev)
    N = 0 if u_CN is None else u_CN.shape[1]
    kp = next_pow2(max(k, 1))
    u_sorted = (torch.sort(u_CN.float(), dim=1).values.to(dev).contiguous() if u_CN is not None
                else torch.zeros(C, 1, device=dev))
    lz_CP = torch.empty(C, P, device=dev)
    lp_CK = torch.empty(C, max(k, 1), device=dev)
    ids_CK = torch.empty(C, max(k, 1), dtype=torch.int32, device=dev)
    tlp_C = torch.empty(C, device=dev)
    scratch = torch.empty(C, kp, dtype=torch.int64, device=dev)  # per row: a tile's few top-k candidates
    draws_CN = torch.empty(C, max(N, 1), dtype=torch.int32, device=dev)
    bv = block or (INTERPRET_BLOCK if interpreting() else GPU_BLOCK)
    bv = max(bv, kp)  # a tile holds at least one top-k's worth of entries (_head)
    if C:
        _extract_kernel[(C,)](z_CV, z_CV.stride(0), V, inv_t, len(temps), targets_C.to(dev).contiguous(), u_sorted,
                              N, draw_t if draw_t is not None else -1, lz_CP, P, lp_CK, ids_CK, max(k, 1), scratch, tlp_C,
                              draws_CN, BV=bv, TP=next_pow2(len(temps)), KP=kp, HAS_TOPK=k > 0, HAS_DRAWS=N > 0,
                              num_warps=GPU_WARPS)
    out = {"log_partition": lz_CP, "target_logprob": tlp_C}
    if k:
        out["topk_ids"], out["topk_logprobs"] = ids_CK, lp_CK
    if N:
        out.update(_unique_counts(draws_CN, V))
    return out


def _unique_counts(ids_CN: torch.Tensor, V: int) -> dict[str, torch.Tensor]:
    """Sorted draws per row -> unique ids + counts (the record's padded layout); rows are in order, so
    the flat keys row * V + id are sorted and a run-length count replaces torch.unique's sort."""
    rows_CN = torch.arange(ids_CN.shape[0], device=ids_CN.device)[:, None].expand_as(ids_CN)
    keys, counts = torch.unique_consecutive((rows_CN * V + ids_CN).reshape(-1), return_counts=True)
    return padded_draws(keys, counts, ids_CN.shape[0], ids_CN.shape[1], V)
