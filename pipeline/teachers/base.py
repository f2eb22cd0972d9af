"""The teacher protocol: ``score(batch) -> TeacherOutput`` plus ``identity()``.

Backends are picked by ``teacher.backend`` from ``TEACHERS``; each is imported only when
chosen, so the vLLM backend costs nothing to users of the HF one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol

import torch

from cache.schema import TeacherOutput
from pipeline.config import ConfigError, choice, ranged

TEACHERS = {"hf": "pipeline.teachers.hf:HFTeacher", "vllm": "pipeline.teachers.vllm:VLLMTeacher"}
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TeacherConfig:
    backend: str = choice("hf", tuple(TEACHERS))
    """Which engine runs the teacher."""
    path: str = ""
    """Model directory or hub id, loaded with from_pretrained."""
    dtype: str = choice("auto", DTYPES)
    """'auto' = bfloat16 on GPU, float32 on CPU."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to from_pretrained ('sdpa', 'eager', 'flash_attention_2')."""
    trust_remote_code: bool = False
    """Allow model code from the model directory."""
    tensor_parallel_size: int = ranged(1, min=1)
    """vLLM: GPUs per engine."""
    gpu_memory_utilization: float = ranged(0.85, above=0.0, max=1.0)
    """vLLM: share of GPU memory the engine may take."""
    max_num_batched_tokens: int = ranged(16384, min=1)
    """vLLM: tokens per engine step."""
    max_model_len: int = ranged(0, min=0)
    """vLLM: longest sequence (0 = data.max_length)."""
    engine_kwargs: dict = field(default_factory=dict)
    """vLLM: further keyword arguments for vllm.LLM."""


@dataclass
class TeacherBatch:
    """A padded batch of whole sequences."""

    sample_ids: torch.Tensor  # [B] int64
    input_ids: torch.Tensor  # [B, L] int64, right-padded
    lengths: torch.Tensor  # [B] int64
    loss_mask: torch.Tensor  # [B, L] uint8


class Teacher(Protocol):
    def score(self, batch: TeacherBatch) -> TeacherOutput: ...

    def identity(self) -> dict: ...


def build_teacher(cfg: TeacherConfig, extract, device: torch.device) -> Teacher:
    module_name, cls_name = TEACHERS[cfg.backend].split(":")
    if not cfg.path:
        raise ConfigError("teacher.path is empty; set it to a model directory or hub id")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(cfg, extract, device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
