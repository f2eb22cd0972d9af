"""The optimizer and learning-rate schedule of the train section (stages/train_student.py's TrainConfig).

AdamW over parameter groups keyed by (the learning-rate multiplier in every phase, weight decay or
not); one LambdaLR factor per group: linear warmup, cosine decay over all phases, times the
group's multiplier in the current phase (0 freezes it for that phase).
"""

from __future__ import annotations

import math
import re

import torch


def lr_multiplier(name: str, phase) -> float:
    for pattern, mult in phase.param_groups.items():
        if re.search(pattern, name):
            return float(mult)
    return phase.default_lr_multiplier


def param_groups(model, cfg) -> list[dict]:
    """Groups by (multiplier in every phase, decay or not); norms, biases and 1-D tensors get no decay."""
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        mults = tuple(lr_multiplier(name, p) for p in cfg.all_phases())
        decay = param.ndim >= 2 and "norm" not in name.lower()
        group = groups.setdefault((mults, decay), {"params": [], "mults": mults,
                                                   "weight_decay": cfg.weight_decay if decay else 0.0})
        group["params"].append(param)
    return list(groups.values())


def phase_of(step: int, phases: list) -> int:
    for i, phase in enumerate(phases):
        if step < phase.steps:
            return i
        step -= phase.steps
    return len(phases) - 1


def schedule(cfg, mults: tuple[float, ...]):
    """Warmup + cosine over all phases, times this group's multiplier in the current phase."""
    total, phases = cfg.total_steps, cfg.all_phases()

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        progress = min(1.0, max(0, step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1))
        cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return warm * cosine * mults[phase_of(step, phases)]

    return factor


def drop_frozen_grads(optimizer) -> None:
    """Parameters at lr 0 in this phase lose their gradient: clipping ignores them, AdamW keeps no moments."""
    for group in optimizer.param_groups:
        if group["lr"] == 0.0:
            for param in group["params"]:
                param.grad = None


def build_optimizer(model, cfg):
    groups = param_groups(model, cfg)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "mults"} for g in groups], lr=cfg.lr,
                                  betas=tuple(cfg.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule(cfg, g["mults"]) for g in groups])
    return optimizer, scheduler
