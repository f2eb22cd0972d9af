"""pipeline/seeding.py: the one per-sequence seeding rule of the cached draws and the trainer's
Monte Carlo expert draws."""

from __future__ import annotations

import hashlib

import torch

from pipeline.router_losses import draw_uniforms
from pipeline.seeding import sequence_generator


def test_the_cached_draws_keep_their_rule():
    """(seed, sample id) hashes as the first cache format did: sha256 of "seed:id", first 8 bytes
    little-endian, top bit cleared. A cache resumed across versions gets the same draws."""
    digest = hashlib.sha256(b"7:12345").digest()
    reference = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    assert torch.equal(torch.rand(4, 3, generator=sequence_generator(7, 12345)), torch.rand(4, 3, generator=reference))


def test_every_part_of_the_key_counts():
    first = torch.rand(8, generator=sequence_generator(1, 2, 3))
    assert torch.equal(first, torch.rand(8, generator=sequence_generator(1, 2, 3)))
    for other in ((1, 2, 4), (1, 3, 2), (2, 1, 3), (12, 3), (1, 23)):
        assert not torch.equal(first[:8], torch.rand(8, generator=sequence_generator(*other)))


def test_mc_draws_are_the_sequences_generator():
    """The trainer's MC uniforms of a sequence are sequence_generator(run.seed, step, sample id)'s."""
    got = draw_uniforms([5, 9], [2, 3], seed=4, step=7, draws=2)
    want = torch.cat([torch.rand(2, 2, generator=sequence_generator(4, 7, 5)),
                      torch.rand(3, 2, generator=sequence_generator(4, 7, 9))])
    assert torch.equal(got, want)
