"""MoE routers: find them, capture their raw logits, turn logits into probabilities.

Each family has its own routing maths. In transformers 5.x the Qwen2/3-MoE, Mixtral and
OLMoE router modules return ``(raw logits, top-k weights, top-k ids)``; the
probabilities over all experts are ``softmax(logits)``. We capture the raw logits with a
forward hook on the router module and apply the family's maths ourselves, so we never
softmax an already-softmaxed output (the double-softmax trap) and never depend on the
model's optional ``output_router_logits`` path (which also computes an auxiliary loss).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.config import ConfigError
from pipeline.layer_map import nearest_layer_map


def _softmax(logits_NE: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits_NE.float(), dim=-1)


@dataclass(frozen=True)
class RouterFamily:
    router_class: str  # class name of the router module (its output[0] is the raw logits)
    probs: Callable[[torch.Tensor], torch.Tensor]  # raw logits [N, E] → probabilities [N, E]


ROUTER_FAMILIES = {
    "qwen3_moe": RouterFamily("Qwen3MoeTopKRouter", _softmax),
    "qwen2_moe": RouterFamily("Qwen2MoeTopKRouter", _softmax),
    "mixtral": RouterFamily("MixtralTopKRouter", _softmax),
    "olmoe": RouterFamily("OlmoeTopKRouter", _softmax),
}
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_LAYER = re.compile(r"layers\.(\d+)\.")


def num_experts(config) -> int:
    """Experts per MoE layer of a transformers config (0: dense); each family names the field its own way."""
    for key in _EXPERT_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def router_family(config) -> RouterFamily | None:
    """The family of a MoE model, None for a dense one; a clear error for unknown MoE families."""
    if num_experts(config) == 0:
        return None
    family = ROUTER_FAMILIES.get(config.model_type)
    if family is None:
        raise ConfigError(
            f"router capture does not support model_type '{config.model_type}' (supported: "
            f"{', '.join(ROUTER_FAMILIES)}); set cache.router_topk=none to cache without router data"
        )
    return family


def find_routers(model, family: RouterFamily) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer index, router module) for every MoE layer, in layer order."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__ == family.router_class:
            match = _LAYER.search(name)
            assert match, f"router {name} has no layer index"
            found.append((int(match.group(1)), module))
    return sorted(found, key=lambda pair: pair[0])


def check_raw_logits(logits_NE: torch.Tensor) -> None:
    """Guard against a router output that is already a probability distribution."""
    rows = logits_NE.float()
    if rows.numel() and bool((rows >= 0).all()) and torch.allclose(rows.sum(-1), torch.ones_like(rows[:, 0]), atol=1e-3):
        raise RuntimeError("router output looks already softmaxed; applying softmax again would flatten it")


class RouterCapture:
    """Context manager: collects each MoE layer's raw router logits [N, E] per forward."""

    def __init__(self, model, family: RouterFamily, layers: list[int] | None = None):
        self.family = family
        self.routers = [(i, m) for i, m in find_routers(model, family) if layers is None or i in layers]
        self.layers = [idx for idx, _ in self.routers]
        self.logits: list[torch.Tensor] = []
        self._handles = []

    def _hook(self, module, args, output) -> None:
        self.logits.append(output[0] if isinstance(output, tuple) else output)

    def __enter__(self) -> "RouterCapture":
        self._handles = [m.register_forward_hook(self._hook) for _, m in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def pop(self) -> list[torch.Tensor]:
        """The logits of the last forward, one [N, E] tensor per MoE layer."""
        out, self.logits = self.logits, []
        assert len(out) == len(self.routers), f"captured {len(out)} router outputs for {len(self.routers)} layers"
        return out


# --- router distillation (student side) -------------------------------------------------
# Shapes: T tokens, L mapped MoE layers, R cached router entries, E_T / E_S experts.


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher MoE layer (position among the teacher's MoE layers) for each student MoE layer:
    the init stage's layer map (pipeline/layer_map.py), nearer of its two blended layers."""
    return nearest_layer_map(n_student, n_teacher)


def teacher_router_dense(ids_TR: torch.Tensor, probs_TR: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """Dense teacher router distribution [T, E_T] from the cached top-k_r entries.

    Mass not cached (k_r < E) is spread uniformly over the uncached experts; exact when
    k_r = E. An ids-only cache (vLLM) gives each routed expert an equal share.
    """
    if probs_TR is None:
        probs_TR = torch.full(ids_TR.shape, 1.0 / ids_TR.shape[1], device=ids_TR.device)
    probs_TR, ids_TR = probs_TR.float(), ids_TR.long()  # the reader's expert ids are uint8/int16
    dense_TE = torch.zeros(ids_TR.shape[0], num_experts, device=ids_TR.device).scatter_(1, ids_TR, probs_TR)
    uncached = num_experts - ids_TR.shape[1]
    if uncached > 0:
        tail_T = (1.0 - probs_TR.sum(-1)).clamp(min=0.0)
        stored_TE = torch.zeros_like(dense_TE).scatter_(1, ids_TR, 1.0)
        dense_TE = dense_TE + (1 - stored_TE) * (tail_T / uncached)[:, None]
    return dense_TE / dense_TE.sum(-1, keepdim=True).clamp(min=1e-12)


def map_experts(teacher_TE: torch.Tensor, num_student: int) -> torch.Tensor:
    """Sum contiguous blocks of E_T / E_S teacher experts into one student expert's target."""
    e_t = teacher_TE.shape[1]
    if e_t == num_student:
        return teacher_TE
    if e_t % num_student:
        raise ConfigError(f"the teacher has {e_t} experts per layer and the student {num_student}; "
                          f"expert mapping needs E_T divisible by E_S")
    return teacher_TE.reshape(teacher_TE.shape[0], num_student, e_t // num_student).sum(-1)


def router_kl(student_logits_TE: torch.Tensor, teacher_TE: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher ‖ softmax(student logits)) in fp32."""
    log_p_TE = torch.log_softmax(student_logits_TE.float(), dim=-1)
    q_TE = teacher_TE.float()
    return (torch.xlogy(q_TE, q_TE) - q_TE * log_p_TE).sum(-1)
