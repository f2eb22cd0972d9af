"""MoE-to-MoE router losses (issue 5): entropy-aware router distillation, Monte Carlo expert
exploration with a coverage KL, the family's load-balancing loss, expert-load statistics.

Adapted from B-Distill ("Balanced Knowledge Distillation for LLMs with Mixture-of-Experts") to
natively MoE teachers and students and to the cached top-k_r router data; unlike its reference
code, the student's router stays in the graph and the router temperature is trained.
docs/router.md has the formulas.

Shape legend: T valid tokens of a micro-batch (flattened sequence by sequence), N = B·L_seq
router rows of a forward (padding included), E student experts, E_T teacher experts,
K Monte Carlo draws, L student MoE layers, B sequences.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from cache.stats import coefficient_of_variation, load_shares
from cache.schema import TeacherRecord
from pipeline.batches import valid_rows
from pipeline.router import map_experts, router_kl, teacher_router_dense
from pipeline.seeding import sequence_generator

TAU_RANGE = (0.5, 1.5)  # the learnable router temperature is projected into this range
TEACHER_PARTS = ("router", "erd", "mc", "coverage")  # the parts that need the cached teacher router


@dataclass(frozen=True)
class RouterLossSpec:
    """What the student computes beyond CE/KD; the weights themselves live in TrainConfig."""

    parts: frozenset = frozenset()  # of "router", "erd", "mc", "coverage", "aux"
    expert_map: tuple[int, ...] = ()  # student expert per teacher expert; () = contiguous blocks
    entropy_weight: float = 0.1  # beta_H of the ERD term
    mc_draws: int = 3  # K draws per token
    mc_suppress: float = 0.5  # a drawn expert's probability is multiplied by this before the next draw
    mc_target: str = "suppressed"  # a key of MC_TARGETS: how the K draws are weighted
    seed: int = 0  # run.seed; the draws of a sequence depend on (seed, step, sample id) only
    top_k: int = 2  # the student's experts per token (load statistics, aux loss)
    model_type: str = ""  # the student's family: its modeling module provides load_balancing_loss_func
    temperature_init: float = 1.0
    learn_temperature: bool = True

    def needs_teacher(self) -> bool:
        return bool(self.parts & set(TEACHER_PARTS))


# --- teacher side ---------------------------------------------------------------------------


def map_experts_explicit(teacher_TE: torch.Tensor, expert_map: tuple[int, ...], num_student: int) -> torch.Tensor:
    """Student target [T, E]: each teacher expert's probability added to its mapped student expert."""
    index_E = torch.as_tensor(expert_map, device=teacher_TE.device)
    out_TE = teacher_TE.new_zeros(teacher_TE.shape[0], num_student)
    return out_TE.index_add_(1, index_E, teacher_TE)


def teacher_mapped(teacher: TeacherRecord, layer: int, teacher_experts: int, num_student: int,
                   expert_map: tuple[int, ...] = ()) -> torch.Tensor:
    """The teacher's router distribution of MoE layer ``layer`` in the student's experts [T, E]."""
    probs_TLR = teacher.router_probs
    dense_TE = teacher_router_dense(teacher.router_ids[:, layer], None if probs_TLR is None else probs_TLR[:, layer],
                                    teacher_experts)
    if expert_map:
        return map_experts_explicit(dense_TE, expert_map, num_student)
    return map_experts(dense_TE, num_student)


# --- entropy-aware router distillation ------------------------------------------------------


def erd_loss(student_logits_TE: torch.Tensor, teacher_TE: torch.Tensor, tau: torch.Tensor,
             entropy_weight: float) -> torch.Tensor:
    """Per token [T]: KL(p_T ‖ softmax(g_S/τ)) − β_H·H(softmax(g_S/τ)), fp32."""
    log_p_TE = torch.log_softmax(student_logits_TE.float() / tau.float(), dim=-1)
    q_TE = teacher_TE.float()
    kl_T = (torch.xlogy(q_TE, q_TE) - q_TE * log_p_TE).sum(-1)
    entropy_T = -(log_p_TE.exp() * log_p_TE).sum(-1)
    return kl_T - entropy_weight * entropy_T


# --- Monte Carlo expert exploration ---------------------------------------------------------


def draw_uniforms(sample_ids_B, lengths_B, seed: int, step: int, draws: int) -> torch.Tensor:
    """Uniforms [T, K] on the CPU, one generator per sequence keyed by (seed, step, sample id)
    (pipeline/seeding.py): the same sequence at the same step gets the same draws whatever the
    batching, rank count or resume point. Sample ids and lengths: host sequences of ints (or CPU tensors)."""
    rows = []
    for sid, n in zip([int(x) for x in sample_ids_B], [int(x) for x in lengths_B]):
        rows.append(torch.rand(int(n), draws, generator=sequence_generator(seed, step, sid)))
    return torch.cat(rows) if rows else torch.zeros(0, draws)


def suppressed_draws(teacher_TE: torch.Tensor, uniforms_TK: torch.Tensor,
                     suppress: float) -> tuple[torch.Tensor, torch.Tensor]:
    """K sequential draws per token by inverse CDF; after each draw the drawn expert's probability
    is multiplied by ``suppress`` and the distribution renormalised. Returns the drawn ids [T, K]
    and the (renormalised) probability each was drawn with [T, K]."""
    p_TE = teacher_TE.detach().float().clone()
    ids, weights = [], []
    for k in range(uniforms_TK.shape[1]):
        cdf_TE = p_TE.cumsum(-1)
        total_T = cdf_TE[:, -1]
        target_T = uniforms_TK[:, k].to(p_TE) * total_T
        id_T = torch.searchsorted(cdf_TE, target_T[:, None], right=True)[:, 0].clamp(max=p_TE.shape[1] - 1)
        p_T = p_TE.gather(1, id_T[:, None])[:, 0]
        ids.append(id_T)
        weights.append(p_T / total_T.clamp(min=1e-12))
        p_TE.scatter_(1, id_T[:, None], (p_T * suppress)[:, None])
    return torch.stack(ids, 1), torch.stack(weights, 1)


def suppressed_weights(draw_probs_TK: torch.Tensor) -> torch.Tensor:
    """1/K per draw: the expected target is the mean of the K suppressed draw distributions
    (the teacher's distribution after suppression, flatter than q: exploration spreads)."""
    return torch.full_like(draw_probs_TK, 1.0 / draw_probs_TK.shape[1])


def bdistill_weights(draw_probs_TK: torch.Tensor) -> torch.Tensor:
    """w_k / Σw with w_k = the probability e_k was drawn with, as B-Distill's released code does.
    A draw is weighted by its own probability again, so the target is sharper than q (≈ q²)."""
    return draw_probs_TK / draw_probs_TK.sum(-1, keepdim=True).clamp(min=1e-12)


# How the K draws of a token are weighted (train.router_mc_target); docs/router.md derives both targets.
MC_TARGETS = {"suppressed": suppressed_weights, "bdistill": bdistill_weights}


def mc_weights(draw_probs_TK: torch.Tensor, target: str) -> torch.Tensor:
    """Per-draw weights [T, K] summing to 1 per token (see MC_TARGETS)."""
    if target not in MC_TARGETS:
        raise ValueError(f"MC target {target!r} is not allowed; allowed: {', '.join(MC_TARGETS)}")
    return MC_TARGETS[target](draw_probs_TK)


def mc_loss(student_logits_TE: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Per token [T]: −Σ_k w_k·log p_S(e_k), p_S = softmax(student logits) (the student's routing).

    With weights summing to 1 this is the cross-entropy to the sampled target Σ_k w_k·onehot(e_k),
    whose expectation over the draws is the distribution the router is trained towards."""
    log_p_TE = torch.log_softmax(student_logits_TE.float(), dim=-1)
    return -(weights_TK * log_p_TE.gather(1, ids_TK)).sum(-1)


def coverage_kl(teacher_TE: torch.Tensor, student_logits_TE: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """KL(c_T ‖ c_S), c = mean over the masked-in tokens of the router distribution [E]; 0 if none."""
    m_T = mask_T.float()
    n = m_T.sum().clamp(min=1.0)
    c_t_E = (teacher_TE.float() * m_T[:, None]).sum(0) / n
    c_s_E = (torch.softmax(student_logits_TE.float(), -1) * m_T[:, None]).sum(0) / n
    kl = (torch.xlogy(c_t_E, c_t_E) - c_t_E * torch.log(c_s_E.clamp(min=1e-12))).sum()
    return kl * (m_T.sum() > 0)


# --- load balance ---------------------------------------------------------------------------


def family_aux_loss(model_type: str):
    """The family's own Switch-style ``load_balancing_loss_func`` from its modeling module."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return module.load_balancing_loss_func


def aux_loss(logits_LNE: list[torch.Tensor], num_experts: int, top_k: int, attention_mask_BS: torch.Tensor,
             model_type: str) -> torch.Tensor:
    """The student family's auxiliary load-balancing loss over its MoE layers (padding excluded)."""
    fn = family_aux_loss(model_type)
    logits = tuple(g.float() for g in logits_LNE)
    return fn(logits, num_experts, top_k, attention_mask_BS)


@torch.no_grad()
def expert_counts(logits_NE: torch.Tensor, valid_N: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens routed to each expert [E] by top-k, summed router entropy) over the valid rows.

    valid_N: the rows, as int64 indices (no sync) or a bool mask [N]. The counts are a
    scatter-add into E bins (bincount would read its input's maximum back to the host)."""
    rows_V = valid_N.nonzero()[:, 0] if valid_N.dtype == torch.bool else valid_N
    g_VE = logits_NE.index_select(0, rows_V).float()
    ids_X = g_VE.topk(top_k, -1).indices.reshape(-1)
    counts_E = g_VE.new_zeros(g_VE.shape[1]).scatter_add_(0, ids_X, torch.ones_like(ids_X, dtype=g_VE.dtype))
    log_p_VE = torch.log_softmax(g_VE, -1)
    return counts_E, -(log_p_VE.exp() * log_p_VE).sum()


def load_per_layer(counts_LE: torch.Tensor, entropy_sum_L: torch.Tensor, rows) -> dict[str, torch.Tensor]:
    """Per layer, float64 on the counts' device: load share histogram [L, E], coefficient of
    variation of the load, mean router entropy (nats), share of experts that received no token [L]."""
    counts_LE, entropy_sum_L = counts_LE.double(), entropy_sum_L.double()
    shares_LE = load_shares(counts_LE)
    return {"load_histogram": shares_LE, "load_cv": coefficient_of_variation(shares_LE),
            "router_entropy": entropy_sum_L / max(float(rows), 1.0),
            "dead_experts": (counts_LE == 0).double().mean(-1)}


def load_summary(counts_LE: torch.Tensor, entropy_sum_L: torch.Tensor, rows: float) -> dict[str, list]:
    """load_per_layer as lists (the evaluation's report)."""
    return {k: v.cpu().tolist() for k, v in load_per_layer(counts_LE, entropy_sum_L, rows).items()}


def load_stats(logits_LNE: list[torch.Tensor], valid_N: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """Layer means of load CV, router entropy and dead-expert share for one forward, as 0-dim
    float64 device tensors (read back only with the log line). valid_N: int64 row indices."""
    pairs = [expert_counts(g, valid_N, top_k) for g in logits_LNE]
    per_layer = load_per_layer(torch.stack([c for c, _ in pairs]), torch.stack([h for _, h in pairs]),
                               valid_N.shape[0])
    return {k: per_layer[k].mean() for k in ("load_cv", "router_entropy", "dead_experts")}


# --- all parts of one forward -----------------------------------------------------------------


def router_parts(logits_LNE: list[torch.Tensor], batch: dict, spec: RouterLossSpec, layer_map: list[int],
                 teacher_experts: int, tau_L: torch.Tensor | None, step: int = 0) -> dict[str, torch.Tensor]:
    """Sums over the micro-batch's loss-masked tokens (the trainer divides by the global count), by
    LossSums name. Per-token parts (router, erd, mc) are means over mapped layers; batch-level ones
    (coverage, aux) are multiplied by the micro-batch's masked-token count, so the trainer's
    division makes them token-weighted means over micro-batches and ranks. ``step`` seeds the MC draws.
    """
    n_tokens = batch["loss_mask"].float().sum()
    out = teacher_parts(logits_LNE, batch, spec, layer_map, teacher_experts, tau_L, step) if spec.needs_teacher() else {}
    if "aux" in spec.parts:
        out["aux"] = aux_loss(logits_LNE, logits_LNE[0].shape[-1], spec.top_k, batch["attention_mask"],
                              spec.model_type) * n_tokens
    return out


def mc_uniforms(batch: dict, seed: int, draws: int, step: int) -> torch.Tensor:
    """The MC draws' uniforms [T, draws] of a micro-batch at a step, from its host data when it has
    some (the trainer's: pipeline.batches.host_view), else from its tensors."""
    host = batch.get("host")
    if host is not None:
        return draw_uniforms(host["sample_ids"], host["lengths"], seed, step, draws)
    return draw_uniforms(batch["sample_ids"].cpu(), batch["valid"].sum(1).cpu(), seed, step, draws)


def teacher_parts(logits_LNE, batch: dict, spec: RouterLossSpec, layer_map: list[int], teacher_experts: int,
                  tau_L: torch.Tensor | None, step: int) -> dict[str, torch.Tensor]:
    rows_T = valid_rows(batch)
    mask_T = batch["loss_mask"].float()
    sums = {p: mask_T.new_zeros(()) for p in TEACHER_PARTS if p in spec.parts}
    k = spec.mc_draws
    if "mc" in spec.parts:
        uniforms_TX = mc_uniforms(batch, spec.seed, k * len(layer_map), step).to(mask_T.device, non_blocking=True)
    for s, t in enumerate(layer_map):
        g_TE = logits_LNE[s].index_select(0, rows_T)  # = logits[valid], no sync
        q_TE = teacher_mapped(batch["teacher"], t, teacher_experts, g_TE.shape[1], spec.expert_map)
        if "router" in sums:
            sums["router"] = sums["router"] + (router_kl(g_TE, q_TE) * mask_T).sum()
        if "erd" in sums:
            sums["erd"] = sums["erd"] + (erd_loss(g_TE, q_TE, tau_L[s], spec.entropy_weight) * mask_T).sum()
        if "mc" in sums:
            ids_TK, drawn_TK = suppressed_draws(q_TE, uniforms_TX[:, s * k:(s + 1) * k], spec.mc_suppress)
            w_TK = mc_weights(drawn_TK, spec.mc_target)
            sums["mc"] = sums["mc"] + (mc_loss(g_TE, ids_TK, w_TK) * mask_T).sum()
        if "coverage" in sums:
            sums["coverage"] = sums["coverage"] + coverage_kl(q_TE, g_TE, mask_T) * mask_T.sum()
    return {p: v / max(len(layer_map), 1) for p, v in sums.items()}
