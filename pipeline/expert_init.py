"""Weight-space student init, MoE part: expert fingerprints, KMeans, Hungarian assignment, synthesis.

For one student MoE layer: every expert of the (one or two) teacher layers it maps to is
projected to the student's width, described by a fingerprint, and the pool is clustered
into E_S groups (KMeans, fixed seed; a teacher layer's experts weigh 1 − w or w). Cluster c
becomes one student expert: the weighted mean of its members' projected weights, with the
weighted mean of their projected router rows as its router row, so the router sends tokens
to the expert that was built from the experts the teacher sent them to.

Experts of two different layers are not aligned unit-by-unit, so expert tensors are never
blended element-wise like dense tensors: pooling replaces blending.

Shape legend: E experts, M pooled teacher experts, C clusters, H hidden, I expert
intermediate, F fingerprint features.
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


def project_bank(bank: ExpertBank, hidden: int, inter: int, key: str, method: str) -> ExpertBank:
    """Every expert matrix (and the router's hidden axis) reduced to the student's H and I."""
    idx_h, idx_i = torch.arange(hidden), torch.arange(inter)
    idx_e = torch.arange(bank.router_EH.shape[0])

    def stack(w_EOI: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, part: str) -> torch.Tensor:
        return torch.stack([project_matrix(w, rows, cols, f"{key}.{part}[{e}]", method) for e, w in enumerate(w_EOI)])

    return ExpertBank(project_matrix(bank.router_EH, idx_e, idx_h, f"{key}.router", method),
                      stack(bank.gate_EIH, idx_i, idx_h, "gate"), stack(bank.up_EIH, idx_i, idx_h, "up"),
                      stack(bank.down_EHI, idx_h, idx_i, "down"), bank.weight)


def fingerprints(bank: ExpertBank) -> torch.Tensor:
    """[E, 3H]: router row, per-hidden-unit input norms, per-hidden-unit output norms, each unit-length.

    Norms over the intermediate axis do not change when an expert's hidden units are
    permuted, so two experts that compute the same function get the same fingerprint.
    """
    reads_EH = torch.sqrt(bank.gate_EIH.pow(2).sum(1) + bank.up_EIH.pow(2).sum(1))
    writes_EH = bank.down_EHI.norm(dim=2)
    parts = [bank.router_EH, reads_EH, writes_EH]
    return torch.cat([F.normalize(p.float(), dim=1) for p in parts], dim=1)


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
    banks = []
    for layer, wt in sorted(source.weights(), key=lambda p: -p[1]):  # nearer layer first
        bank = bank_from_state(teacher, moe_names(teacher_type, layer), wt)
        banks.append(project_bank(bank, hidden, inter, f"teacher.layers.{layer}", method))
    pool, weight_M = pool_banks(banks)
    fp_MF = fingerprints(pool)
    labels = cluster(fp_MF, weight_M, n_experts, seed)
    student_fp = fingerprints(bank_from_state(student_state, student_names)) if student_state else None
    order = assign(centroids(fp_MF, weight_M, labels, n_experts), student_fp, labels)
    out = synthesize(pool, weight_M, labels, order)
    log.info("init: %s ← teacher %s, cluster sizes %s", student_names[0], source,
             [int((labels == c).sum()) for c in order])
    router, gate_up, down = student_names
    return {router: out.router_EH, gate_up: torch.cat([out.gate_EIH, out.up_EIH], dim=1), down: out.down_EHI}
