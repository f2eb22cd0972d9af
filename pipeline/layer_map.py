"""Which teacher layers a student layer stands for: one map, used by the init stage (blend of two
teacher layers per student layer) and by router distillation (one teacher MoE layer per student
MoE layer), so a student initialised from teacher layers (a, b) is router-distilled from them.

Student layer s of L_S sits at teacher position p(s) = s·(L_T−1)/(L_S−1): evenly spaced, both
ends pinned to the teacher's ends; a single student layer (L_S = 1) sits in the middle,
p = (L_T−1)/2. Init blends teacher layers floor(p) and floor(p)+1 with weight w = p − floor(p);
the router takes the one of the two with the larger weight (floor(p) + [w ≥ 1/2]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_EPS = 1e-9  # positions s·(L_T−1)/(L_S−1) that should be integers can land 1 ulp below one


@dataclass(frozen=True)
class LayerSource:
    """Teacher layers lo and hi blended as (1 − w)·lo + w·hi for one student layer."""

    lo: int
    hi: int
    w: float

    def weights(self) -> list[tuple[int, float]]:
        """(teacher layer, weight) pairs with a non-zero weight."""
        pairs = [(self.lo, 1.0 - self.w)] if self.lo == self.hi else [(self.lo, 1.0 - self.w), (self.hi, self.w)]
        return [(layer, wt) for layer, wt in pairs if wt > 0]

    def nearest(self) -> int:
        """The teacher layer with the larger weight (hi on a tie)."""
        return self.hi if self.w >= 0.5 else self.lo


def position(s: int, n_student: int, n_teacher: int) -> float:
    """Teacher position p(s) of student layer s (fractional between two teacher layers)."""
    return (n_teacher - 1) / 2 if n_student == 1 else s * (n_teacher - 1) / (n_student - 1)


def layer_map(n_student: int, n_teacher: int) -> list[LayerSource]:
    """Student layer s ↔ teacher position p(s), linear between its two neighbours."""
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"layer counts must be positive, got student={n_student} teacher={n_teacher}")
    out = []
    for s in range(n_student):
        pos = position(s, n_student, n_teacher)
        lo = min(int(math.floor(pos + _EPS)), n_teacher - 1)
        hi = min(lo + 1, n_teacher - 1)
        w = 0.0 if lo == hi else max(pos - lo, 0.0)
        out.append(LayerSource(lo, hi, round(w, 9) if w > _EPS else 0.0))
    return out


def nearest_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """One teacher layer per student layer: the nearer of the two that ``layer_map`` blends."""
    return [src.nearest() for src in layer_map(n_student, n_teacher)]
