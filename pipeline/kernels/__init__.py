"""Triton kernels for the GPU paths (docs/kernels.md): phase two's fused LM head + CE + KD
(fused_ce_kd.py) and phase one's extraction over rows of logits (extract.py).

Nothing here is imported unless a Triton path is selected (``train.fused_loss=triton``,
``cache.extract_kernel=triton``), so a machine without triton never needs it. Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors (the CI tests); otherwise they need CUDA.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: triton.jit then runs the kernels in numpy on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable(device: torch.device) -> str | None:
    """None when the Triton kernels can run on tensors of ``device``, else why not (one line)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if interpreting():
        return None if device.type == "cpu" else f"TRITON_INTERPRET=1 runs on CPU tensors, not {device.type}"
    if device.type != "cuda":
        return f"the Triton kernels run on CUDA devices (or on CPU under TRITON_INTERPRET=1), not {device.type}"
    return None


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
