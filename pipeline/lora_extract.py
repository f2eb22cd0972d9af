"""The student init as a PEFT LoRA adapter on the student: Δ = synthetic − student, factored by SVD.

Every tensor the init changes is written in one of three ways:

* ``nn.Linear`` weight → LoRA on the module (``target_modules``): rank-r SVD of Δ [O, I].
* any other 2-D or 3-D parameter (a router's ``weight``, transformers 5.x fused expert
  stacks ``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I]) → LoRA on the parameter
  (PEFT's ``target_parameters``): one rank-r SVD per expert slice, laid out the way PEFT's
  ``ParamWrapper`` reads it.
* 1-D parameters of non-Linear modules (norms) and embeddings → full copies
  (``modules_to_save``) when ``full_copies`` is on; otherwise they keep the student's
  values, with a log line. ``nn.Linear`` biases are never adapted (logged).

Each target gets lora_alpha = r (``alpha_pattern`` mirrors ``rank_pattern``), so PEFT's
scaling α/r is exactly 1 and B·A = Δ_r is applied once, at merge or in the forward.

Shape legend: O out features, I in features, R rank, E experts.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)
ADAPTER = "default"


@dataclass
class LoraPlan:
    """Which student tensors go where in the adapter, with each LoRA target's rank."""

    modules: dict[str, int] = field(default_factory=dict)
    """nn.Linear module name → rank."""
    params: dict[str, int] = field(default_factory=dict)
    """Parameter name (router, fused experts) → rank."""
    copies: list[str] = field(default_factory=list)
    """Module names written as full copies (modules_to_save)."""


def rank_for(name: str, rank_map: dict[str, int], default: int) -> int:
    """The rank of the first regex in ``rank_map`` found in ``name`` (``re.search``), else ``default``."""
    for pattern, rank in rank_map.items():
        if re.search(pattern, name):
            return int(rank)
    return default


def lowrank_factors(delta_OI: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [O, R], A [R, I]) with B·A the best rank-R approximation of Δ (exact when R ≥ min(O, I))."""
    u, s, vh = torch.linalg.svd(delta_OI.double(), full_matrices=False)
    rank = min(rank, s.shape[0])
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


def expert_factors(delta_EOI: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT ParamWrapper layout of per-expert factors: A [E·R, I] expert-major, B [O, R·E] rank-major."""
    pairs = [lowrank_factors(d, rank) for d in delta_EOI]
    b_ERO = torch.stack([b.T for b, _ in pairs])
    a_EI = torch.cat([a for _, a in pairs])
    return b_ERO.permute(2, 1, 0).reshape(delta_EOI.shape[1], -1), a_EI


def plan_targets(model: nn.Module, changed: list[str], rank_map: dict[str, int], default_rank: int,
                 full_copies: bool) -> LoraPlan:
    """Sort the changed tensors into LoRA modules, LoRA parameters and full copies."""
    plan = LoraPlan()
    for name in changed:
        module_name, pname = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        param = getattr(module, pname)
        if isinstance(module, nn.Linear) and pname == "bias":
            log.info("init: %s is a Linear bias, which LoRA does not adapt; it keeps the student's value", name)
        elif param.dim() == 1 or isinstance(module, nn.Embedding):
            if full_copies:
                plan.copies.append(module_name)
            else:
                log.info("init: %s is not LoRA-able and full copies are off; it keeps the student's value", name)
        else:
            key = module_name if isinstance(module, nn.Linear) else name
            rank = min(rank_for(key, rank_map, default_rank), min(param.shape[-2:]))
            if rank <= 0:
                log.info("init: %s has rank 0 in the rank map; excluded from the adapter", key)
            else:
                (plan.modules if isinstance(module, nn.Linear) else plan.params)[key] = rank
    plan.copies = sorted(set(plan.copies))
    return plan


def lora_config(plan: LoraPlan, default_rank: int):
    from peft import LoraConfig

    ranks = {re.escape(k): r for k, r in {**plan.modules, **plan.params}.items()}
    return LoraConfig(r=default_rank, lora_alpha=default_rank, lora_dropout=0.0, rank_pattern=ranks,
                      alpha_pattern=dict(ranks), target_modules=sorted(plan.modules) or None,
                      target_parameters=sorted(plan.params) or None, modules_to_save=plan.copies or None)


def _param_wrapper(root: nn.Module, name: str):
    """The ParamWrapper that adapts parameter ``name`` (PEFT nests one wrapper per parameter)."""
    module_name, pname = name.rsplit(".", 1)
    module = root.get_submodule(module_name)
    while getattr(module, "parameter_name", None) != pname:
        module = module.base_layer
    return module


@torch.no_grad()
def fill_adapter(peft_model, plan: LoraPlan, synthetic: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> None:
    """Write the SVD factors of Δ and the full copies into a fresh PEFT model."""
    root = peft_model.base_model.model
    for module_name, rank in plan.modules.items():
        name = f"{module_name}.weight"
        b, a = lowrank_factors(synthetic[name] - base[name].float(), rank)
        layer = root.get_submodule(module_name)
        layer.lora_A[ADAPTER].weight.copy_(a)
        layer.lora_B[ADAPTER].weight.copy_(b)
    for name, rank in plan.params.items():
        delta = synthetic[name] - base[name].float()
        b, a = expert_factors(delta if delta.dim() == 3 else delta[None], rank)
        wrapper = _param_wrapper(root, name)
        wrapper.lora_A[ADAPTER].weight.copy_(a)
        wrapper.lora_B[ADAPTER].weight.copy_(b)
    for module_name in plan.copies:
        copy = root.get_submodule(module_name).modules_to_save[ADAPTER]
        for pname, param in copy.named_parameters(recurse=False):
            param.copy_(synthetic.get(f"{module_name}.{pname}", param))


def save_adapter(student: nn.Module, synthetic: dict[str, torch.Tensor], rank_map: dict[str, int],
                 default_rank: int, full_copies: bool, out_dir: Path) -> LoraPlan:
    """PEFT adapter (adapter_config.json + adapter_model.safetensors) turning ``student`` into ``synthetic``."""
    from peft import get_peft_model

    base = {k: v.detach().clone() for k, v in student.state_dict().items()}
    changed = [n for n, w in synthetic.items() if not torch.equal(w, base[n].float())]
    plan = plan_targets(student, changed, rank_map, default_rank, full_copies)
    with warnings.catch_warnings():
        # PEFT checks rank_pattern keys against target_modules only and warns about the
        # target_parameters keys, although it applies them (the tests check the saved ranks).
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match any targeted module")
        peft_model = get_peft_model(student, lora_config(plan, default_rank))
    fill_adapter(peft_model, plan, synthetic, base)
    peft_model.save_pretrained(out_dir)
    log.info("init: adapter with %d LoRA modules, %d LoRA parameters, %d full copies → %s",
             len(plan.modules), len(plan.params), len(plan.copies), out_dir)
    return plan
