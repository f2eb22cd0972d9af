"""Rank, world size, device and barriers for multi-process stages (torchrun / accelerate).

A thin layer over accelerate's PartialState: gloo on CPU, NCCL on GPUs, one process
when no launcher set the environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch

from pipeline.config import ConfigError


def use_cpu(device: str) -> bool:
    """run.device: 'cpu', 'cuda', or 'auto' (CUDA when available); 'cuda' without one is one line."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is visible; use run.device=auto or run.device=cpu")
    return device == "cpu" or not torch.cuda.is_available()


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device
    _state: object = None

    @classmethod
    def from_env(cls, cpu: bool | None = None, timeout_s: float | None = None) -> "Dist":
        """``timeout_s``: how long a collective (a barrier) waits for the other ranks; it applies
        when this call creates the process group (the first in a process), else torch's default."""
        from accelerate import PartialState  # lazy: ~2 s of import beyond torch; use_cpu alone needs none of it

        cpu = not torch.cuda.is_available() if cpu is None else cpu
        st = PartialState(cpu=cpu, **({"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}))
        return cls(rank=st.process_index, world_size=st.num_processes, device=st.device, _state=st)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            self._state.wait_for_everyone()
