"""Weight-space student init, MoE part: expert fingerprints, KMeans, Hungarian assignment, synthesis.

For one student MoE layer: every expert of the (one or two) teacher layers it maps to is
described by a permutation-invariant fingerprint, and the pool is clustered into E_S groups
(KMeans, fixed seed; a teacher layer's experts weigh 1 − w or w). Within a cluster, every
member's intermediate units are permuted to match a reference member (Hungarian matching of
units by their weights), then each member is projected to the student's width and cluster c
becomes one student expert: the weighted mean of its aligned members, with the weighted mean
of their projected router rows as its router row, so the router sends tokens to the expert
that was built from the experts the teacher sent them to.

An expert's output does not change when its intermediate units are permuted (gate rows, up
rows and down columns together), so two experts can compute the same function with their
units in different orders; averaging them unit by unit without the alignment mixes unrelated
units. Experts of two teacher layers are pooled (and aligned), never blended element-wise.

Shape legend: E experts, M pooled teacher experts, C clusters, H hidden, I expert
intermediate, F fingerprint / unit features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.layer_map import LayerSource
from pipeline.weight_init import project_matrix

log = logging.getLogger(__name__)

# model_type → (router weight [E, H], fused gate|up [E, 2I, H], fused down [E, H, I]) under model.layers.{i}.
# transformers 5.x stores these families' experts as 3-D parameters (gate rows first, then up rows).
_FUSED = ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")
MOE_NAMES = {"qwen3_moe": _FUSED, "qwen2_moe": _FUSED, "mixtral": _FUSED, "olmoe": _FUSED}
KMEANS_N_INIT = 10
"""KMeans restarts (the best inertia wins; deterministic with the fixed random_state)."""


@dataclass
class ExpertBank:
    """The experts of one MoE layer in the student's width, with their pooling weight."""

    router_EH: torch.Tensor
    gate_EIH: torch.Tensor
    up_EIH: torch.Tensor
    down_EHI: torch.Tensor
    weight: float = 1.0


def moe_names(model_type: str, layer: int) -> tuple[str, str, str]:
    """Full names of (router, gate_up, down) of one layer."""
    if model_type not in MOE_NAMES:
        raise ValueError(f"MoE init does not support model_type '{model_type}'; supported: {', '.join(MOE_NAMES)}")
    return tuple(f"model.layers.{layer}.{suffix}" for suffix in MOE_NAMES[model_type])


def bank_from_state(state: dict[str, torch.Tensor], names: tuple[str, str, str], weight: float = 1.0) -> ExpertBank:
    """A layer's experts as stored (used for the student's own experts)."""
    router, gate_up, down = (state[n].float() for n in names)
    inter = gate_up.shape[1] // 2
    return ExpertBank(router, gate_up[:, :inter], gate_up[:, inter:], down, weight)


def project_router(router_EH: torch.Tensor, hidden: int, key: str, method: str) -> torch.Tensor:
    """A layer's router rows [E, H_T] reduced to the student's hidden units [E, H_S]."""
    return project_matrix(router_EH, torch.arange(router_EH.shape[0]), torch.arange(hidden), f"{key}.router", method)


def project_experts(bank: ExpertBank, hidden: int, inter: int, keys: list[str], method: str) -> ExpertBank:
    """Every expert matrix reduced to the student's H and I (the router rows are kept as they are)."""
    idx_h, idx_i = torch.arange(hidden), torch.arange(inter)

    def stack(w_EOI: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, part: str) -> torch.Tensor:
        return torch.stack([project_matrix(w, rows, cols, f"{k}.{part}", method) for k, w in zip(keys, w_EOI)])

    return ExpertBank(bank.router_EH, stack(bank.gate_EIH, idx_i, idx_h, "gate"), stack(bank.up_EIH, idx_i, idx_h, "up"),
                      stack(bank.down_EHI, idx_h, idx_i, "down"), bank.weight)


def fingerprints(bank: ExpertBank, hidden: int | None = None) -> torch.Tensor:
    """[E, 3H]: router row, per-hidden-unit input norms, per-hidden-unit output norms, each unit-length.

    Norms over the intermediate axis do not change when an expert's intermediate units are
    permuted, so two experts that compute the same function get the same fingerprint. They
    are taken over all of the expert's units, on the first ``hidden`` hidden units (the
    student's; the router rows must already be that wide).
    """
    reads_EH = torch.sqrt(bank.gate_EIH.pow(2).sum(1) + bank.up_EIH.pow(2).sum(1))[:, :hidden]
    writes_EH = bank.down_EHI.norm(dim=2)[:, :hidden]
    parts = [bank.router_EH, reads_EH, writes_EH]
    return torch.cat([F.normalize(p.float(), dim=1) for p in parts], dim=1)


def unit_features(gate_IH: torch.Tensor, up_IH: torch.Tensor, down_HI: torch.Tensor) -> torch.Tensor:
    """[I, 3H] float64: what each intermediate unit reads (gate and up rows) and writes (down column)."""
    return torch.cat([gate_IH, up_IH, down_HI.T], dim=1).double()


def unit_permutation(ref_IF: torch.Tensor, member_IF: torch.Tensor) -> torch.Tensor:
    """perm [I]: the member's unit perm[i] is matched to the reference's unit i, minimising the total
    squared distance of their features (Hungarian, scipy.optimize.linear_sum_assignment)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment((torch.cdist(ref_IF, member_IF) ** 2).numpy())
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)


def align_clusters(pool: ExpertBank, weight_M: torch.Tensor, labels: np.ndarray) -> ExpertBank:
    """The pool with every cluster member's intermediate units permuted onto its cluster's reference
    member (the largest pooling weight, then the lowest index), so averaging adds like to like."""
    gate, up, down = pool.gate_EIH.clone(), pool.up_EIH.clone(), pool.down_EHI.clone()
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        ref = int(members[int(np.argmax(weight_M[members].numpy()))])  # argmax: the first of equal weights
        ref_IF = unit_features(gate[ref], up[ref], down[ref])
        for m in members[members != ref]:
            perm = unit_permutation(ref_IF, unit_features(gate[m], up[m], down[m]))
            gate[m], up[m], down[m] = gate[m][perm], up[m][perm], down[m][:, perm]
    return ExpertBank(pool.router_EH, gate, up, down, pool.weight)


def cluster(fp_MF: torch.Tensor, weight_M: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """Cluster label per pooled expert; every cluster non-empty; identity when k equals the pool size."""
    m = fp_MF.shape[0]
    if k > m:
        raise ValueError(f"student has {k} experts per layer but the teacher pool has only {m}; init only merges experts")
    if k == m:
        return np.arange(m)
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=KMEANS_N_INIT, random_state=seed)
    labels = km.fit_predict(fp_MF.double().numpy(), sample_weight=weight_M.double().numpy())
    return _fill_empty(labels, fp_MF.double().numpy(), km.cluster_centers_)


def _fill_empty(labels: np.ndarray, fp_MF: np.ndarray, centers_CF: np.ndarray) -> np.ndarray:
    """Give an empty cluster the member nearest its centre taken from a cluster with several members."""
    labels = labels.copy()
    for c in range(centers_CF.shape[0]):
        if (labels == c).any():
            continue
        counts = np.bincount(labels, minlength=centers_CF.shape[0])
        movable = np.flatnonzero(counts[labels] > 1)
        dist = ((fp_MF[movable] - centers_CF[c]) ** 2).sum(1)
        labels[movable[int(dist.argmin())]] = c
    return labels


def centroids(fp_MF: torch.Tensor, weight_M: torch.Tensor, labels: np.ndarray, k: int) -> torch.Tensor:
    """[C, F] weighted mean fingerprint of each cluster."""
    onehot_MC = F.one_hot(torch.as_tensor(labels, dtype=torch.long), k).double() * weight_M.double()[:, None]
    return ((onehot_MC.T @ fp_MF.double()) / onehot_MC.sum(0)[:, None]).float()


def assign(centroids_CF: torch.Tensor, student_fp_EF: torch.Tensor | None, labels: np.ndarray) -> list[int]:
    """order[j] = cluster that becomes student expert j.

    With the student's own experts: the minimum-cost matching (Hungarian) on squared
    fingerprint distance. Without: clusters ordered by their lowest pooled-expert index
    (teacher experts in order, nearer layer first), so an unmerged expert keeps its index.
    """
    if student_fp_EF is None:
        first = [int(np.flatnonzero(labels == c).min()) for c in range(centroids_CF.shape[0])]
        return sorted(range(len(first)), key=first.__getitem__)
    from scipy.optimize import linear_sum_assignment

    cost_CE = match_cost(centroids_CF, student_fp_EF)
    rows, cols = linear_sum_assignment(cost_CE)
    order = [0] * len(cols)
    for c, j in zip(rows, cols):
        order[j] = int(c)
    return order


def match_cost(centroids_CF: torch.Tensor, student_fp_EF: torch.Tensor) -> np.ndarray:
    """[C, E] squared distance between cluster centres and the student's experts."""
    return (torch.cdist(centroids_CF.double(), student_fp_EF.double()) ** 2).numpy()


def synthesize(pool: ExpertBank, weight_M: torch.Tensor, labels: np.ndarray, order: list[int]) -> ExpertBank:
    """Student expert j = weighted mean of cluster order[j]'s members (router rows included)."""
    onehot_MC = F.one_hot(torch.as_tensor(labels, dtype=torch.long), len(order)).float() * weight_M[:, None]
    mix_EM = (onehot_MC / onehot_MC.sum(0, keepdim=True)).T[order]

    def mean(w_M: torch.Tensor) -> torch.Tensor:
        return torch.einsum("em,m...->e...", mix_EM, w_M)

    return ExpertBank(mean(pool.router_EH), mean(pool.gate_EIH), mean(pool.up_EIH), mean(pool.down_EHI))


def pool_banks(banks: list[ExpertBank]) -> tuple[ExpertBank, torch.Tensor]:
    """All experts of the source layers in one bank, and each one's weight [M]."""
    weight_M = torch.cat([torch.full((b.router_EH.shape[0],), b.weight) for b in banks])
    cat = [torch.cat([getattr(b, f) for b in banks]) for f in ("router_EH", "gate_EIH", "up_EIH", "down_EHI")]
    return ExpertBank(*cat), weight_M


def init_moe_layer(teacher: dict[str, torch.Tensor], teacher_type: str, source: LayerSource,
                   student_names: tuple[str, str, str], student_shapes: dict[str, tuple[int, ...]],
                   student_state: dict[str, torch.Tensor] | None, seed: int, method: str) -> dict[str, torch.Tensor]:
    """The student layer's router, gate_up and down from the pooled, clustered teacher experts."""
    n_experts, hidden = student_shapes[student_names[0]]
    inter = student_shapes[student_names[2]][2]
    banks, keys = [], []
    for layer, wt in sorted(source.weights(), key=lambda p: -p[1]):  # nearer layer first
        bank = bank_from_state(teacher, moe_names(teacher_type, layer), wt)
        bank.router_EH = project_router(bank.router_EH, hidden, f"teacher.layers.{layer}", method)
        banks.append(bank)
        keys += [f"teacher.layers.{layer}.experts[{e}]" for e in range(bank.router_EH.shape[0])]
    pool, weight_M = pool_banks(banks)  # experts still at the teacher's width: aligned before projection
    fp_MF = fingerprints(pool, hidden)
    labels = cluster(fp_MF, weight_M, n_experts, seed)
    student_fp = fingerprints(bank_from_state(student_state, student_names)) if student_state else None
    order = assign(centroids(fp_MF, weight_M, labels, n_experts), student_fp, labels)
    aligned = project_experts(align_clusters(pool, weight_M, labels), hidden, inter, keys, method)
    out = synthesize(aligned, weight_M, labels, order)
    log.info("init: %s ← teacher %s, cluster sizes %s", student_names[0], source,
             [int((labels == c).sum()) for c in order])
    router, gate_up, down = student_names
    return {router: out.router_EH, gate_up: torch.cat([out.gate_EIH, out.up_EIH], dim=1), down: out.down_EHI}
