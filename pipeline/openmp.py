"""Short OpenMP spin-waits, set before torch loads (its OpenMP runtime reads them once).

After each parallel op, torch's idle OpenMP workers spin-wait for the next one (libgomp's
default: 300,000 iterations). Phase one on CPU hands the cores to the extraction kernel's
threads between torch ops (pipeline/teachers/native.py), and workers still spinning on
those cores slow them down. A short spin (``GOMP_SPINCOUNT=1000``; ``KMP_BLOCKTIME=1`` ms
for Intel's runtime) gives the cores back at once. Measured on 2 cores: the extraction's
share of phase one fell by about a third, the bare forward unchanged within noise
(docs/benchmarks.md). A value already in the environment wins.
"""

from __future__ import annotations

import os
import sys

SHORT_SPIN = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "1"}


def short_spin() -> bool:
    """Set the defaults; False when torch is already loaded (too late to matter)."""
    if "torch" in sys.modules:
        return False
    for key, value in SHORT_SPIN.items():
        os.environ.setdefault(key, value)
    return True
