"""Weight-space student init, dense part: blending and projection (slice or SVD) of one tensor.

No data and no forward pass: every student tensor is computed from the teacher's tensors.

* Layer map (pipeline/layer_map.py, shared with router distillation): student layer s sits at
  teacher position p = s·(L_T−1)/(L_S−1) (evenly spaced, both ends pinned to the teacher's
  ends; L_S = 1 sits in the middle), and its tensors are the blend of teacher layers floor(p)
  and floor(p)+1 with weight p − floor(p).
* Projection: a teacher matrix W [out_T, in_T] becomes the student's [out_S, in_S] as its
  rows ``idx_out`` and columns ``idx_in`` ('slice', the default), or as
  ``U[idx_out, :r] · diag(S[:r]) · V[idx_in, :r]ᵀ`` with r = min(out_S, in_S), the same rows
  and columns of W's best rank-r approximation ('svd'). The index maps pick
  the *same* teacher coordinates for an axis in every tensor (see ``axis_index``), so the
  student's hidden unit j, head h or MLP unit i is the teacher's unit j, h or i everywhere.

Shape legend: O rows (out features), I columns (in features), N flattened elements.
"""

from __future__ import annotations

import logging
import re
import zlib

import torch

log = logging.getLogger(__name__)

LAYER = re.compile(r"\.layers\.(\d+)\.")
FULL_SVD_MAX = 1024
"""Matrices whose smaller side is at most this use a full SVD; larger ones ``torch.svd_lowrank``."""
LOWRANK_OVERSAMPLE = 8
"""Extra random directions ``svd_lowrank`` keeps beyond r (better accuracy on the top r)."""
LOWRANK_NITER = 4
"""Subspace iterations of ``svd_lowrank``."""
BLENDS = ("linear", "slerp")
PROJECTIONS = ("slice", "svd")
# The attention tensors whose axis is laid out as [heads × head_dim]: module name → that axis.
HEAD_AXES = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "q_norm": 0, "k_norm": 0}


def blend(a_N: torch.Tensor, b_N: torch.Tensor, w: float, method: str = "linear") -> torch.Tensor:
    """(1 − w)·a + w·b, or spherical interpolation between a and b (their norms interpolated linearly)."""
    if method not in BLENDS:
        raise ValueError(f"blend method {method!r} is not allowed; allowed: {', '.join(BLENDS)}")
    a, b = a_N.float(), b_N.float()
    if w == 0.0:
        return a.clone()
    if method == "linear":
        return (1.0 - w) * a + w * b
    return _slerp(a, b, w)


def _slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """SLERP of the directions of a and b, scaled by the linearly interpolated norm."""
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return (1.0 - w) * a + w * b
    cos = torch.clamp((a.flatten() @ b.flatten()) / (na * nb), -1.0, 1.0)
    theta = torch.arccos(cos)
    if theta.abs() < 1e-4:  # (nearly) parallel: SLERP degenerates to the linear blend
        return (1.0 - w) * a + w * b
    s = torch.sin(theta)
    direction = (torch.sin((1 - w) * theta) / s) * (a / na) + (torch.sin(w * theta) / s) * (b / nb)
    return direction / direction.norm() * ((1.0 - w) * na + w * nb)


def layer_name(name: str, layer: int) -> str:
    """``name`` with its layer index replaced by ``layer``."""
    return LAYER.sub(f".layers.{layer}.", name, count=1)


def student_layer(name: str) -> int | None:
    match = LAYER.search(name)
    return int(match.group(1)) if match else None


def rope_pair_dims(hd_teacher: int, hd_student: int) -> torch.Tensor:
    """Dims kept inside one head: the first half-width of each rotary half, so pairs (i, i+hd/2) stay together."""
    if hd_student == hd_teacher:
        return torch.arange(hd_teacher)
    if hd_student % 2 or hd_teacher % 2:
        return torch.arange(hd_student)
    half = hd_student // 2
    return torch.cat([torch.arange(half), hd_teacher // 2 + torch.arange(half)])


def head_index(size_teacher: int, size_student: int, hd_teacher: int, hd_student: int) -> torch.Tensor:
    """Heads 0..n_S−1 of a [heads × head_dim] axis, each reduced with ``rope_pair_dims``."""
    n_student = size_student // hd_student
    dims = rope_pair_dims(hd_teacher, hd_student)
    return (torch.arange(n_student)[:, None] * hd_teacher + dims[None, :]).flatten()


def axis_index(name: str, axis: int, size_teacher: int, size_student: int, head_dims: tuple[int, int]) -> torch.Tensor:
    """The teacher coordinates kept on one axis: heads (attention) or the first ``size_student`` units."""
    if size_student > size_teacher:
        raise ValueError(f"student tensor {name} axis {axis} has {size_student} > teacher's {size_teacher}; "
                         "init can only shrink a dimension")
    if size_student == size_teacher:
        return torch.arange(size_teacher)
    hd_t, hd_s = head_dims
    module = name.split(".")[-2] if name.count(".") else name
    is_heads = HEAD_AXES.get(module) == axis and size_teacher % hd_t == 0 and size_student % hd_s == 0
    return head_index(size_teacher, size_student, hd_t, hd_s) if is_heads else torch.arange(size_student)


def _svd(w_OI: torch.Tensor, r: int, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [O, r], S [r], V [I, r]); randomized for big matrices, seeded by ``key`` so every rank agrees."""
    if min(w_OI.shape) <= FULL_SVD_MAX:
        u, s, vh = torch.linalg.svd(w_OI, full_matrices=False)
        return u[:, :r], s[:r], vh[:r].T
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(key.encode()))
        q = min(r + LOWRANK_OVERSAMPLE, min(w_OI.shape))
        u, s, v = torch.svd_lowrank(w_OI, q=q, niter=LOWRANK_NITER)
    return u[:, :r], s[:r], v[:, :r]


def project_matrix(w_OI: torch.Tensor, idx_out: torch.Tensor, idx_in: torch.Tensor, key: str,
                   method: str) -> torch.Tensor:
    """Rows ``idx_out`` × columns ``idx_in`` of W ('slice'), or of W's best rank-r approximation ('svd'),
    r = min(len(idx_out), len(idx_in)).

    The slice is the teacher's own block on the kept coordinates, and it has rank ≤ r already,
    so truncating first is never needed to fit the student and can only move the kept values
    away from the teacher's (docs/init.md, docs/init_study.md)."""
    if method not in PROJECTIONS:
        raise ValueError(f"projection {method!r} is not allowed; allowed: {', '.join(PROJECTIONS)}")
    w_OI = w_OI.float()
    r = min(len(idx_out), len(idx_in))
    sliced = w_OI[idx_out][:, idx_in]
    if method == "slice" or r >= min(w_OI.shape):  # rank-r truncation would change nothing
        return sliced.clone()
    try:
        u, s, v = _svd(w_OI, r, key)
        out = (u[idx_out] * s) @ v[idx_in].T
    except (RuntimeError, torch.linalg.LinAlgError) as err:
        log.warning("init: SVD of %s failed (%s); falling back to slicing", key, err)
        return sliced.clone()
    if not torch.isfinite(out).all():
        log.warning("init: SVD of %s gave non-finite values; falling back to slicing", key)
        return sliced.clone()
    return out


def project_tensor(name: str, w_T: torch.Tensor, shape_student: tuple[int, ...], head_dims: tuple[int, int],
                   method: str) -> torch.Tensor:
    """A teacher tensor of any rank (1-D, 2-D, or a stack of 2-D along axis 0) in the student's shape."""
    idx = [axis_index(name, a, w_T.shape[a], shape_student[a], head_dims) for a in range(w_T.dim())]
    if w_T.dim() == 1:
        return w_T.float()[idx[0]].clone()
    if w_T.dim() == 2:
        return project_matrix(w_T, idx[0], idx[1], name, method)
    if w_T.dim() == 3:
        return torch.stack([project_matrix(w_T[i], idx[1], idx[2], f"{name}[{i}]", method) for i in idx[0].tolist()])
    raise ValueError(f"tensor {name} has {w_T.dim()} dimensions; init supports 1-D, 2-D and 3-D tensors")
