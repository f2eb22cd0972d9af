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

    def __init__(self, model, family: RouterFamily):
        self.family = family
        self.routers = find_routers(model, family)
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
