"""One rule for every per-sequence random draw: a CPU ``torch.Generator`` keyed by integers.

The cache's sampled targets use (cache.seed, sample id); the trainer's Monte Carlo expert
draws use (run.seed, step, sample id). Keyed by the sequence, not by its batch or rank, the
draws are the same whatever the batching, the rank count or the resume point. The key's
decimal digits, joined by ':', are hashed with sha256: the cached draws of kdcache's first
format depend on exactly this rule (a cache resumed across versions must not change it).
"""

from __future__ import annotations

import hashlib

import torch


def sequence_generator(*key: int) -> torch.Generator:
    """A generator that depends on ``key`` only, e.g. (seed, sample id) or (seed, step, sample id)."""
    digest = hashlib.sha256(":".join(str(int(k)) for k in key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
