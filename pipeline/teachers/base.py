"""The teacher protocol (``score(batch) -> Sequences``, ``identity()``, ``close()`` and what the
cache stage checks), its config and its input batch.

Backends are picked by ``teacher.backend`` from ``TEACHERS`` (pipeline/teachers/backends.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from cache.schema import Sequences
from pipeline.config import ConfigError, choice, ranged

BACKENDS = ("hf", "vllm")  # the names of backends.TEACHERS (which imports this module, so cannot be read here)
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TeacherConfig:
    backend: str = choice("hf", BACKENDS)
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
    vocab_size: int  # rows of the output embedding (>= the tokenizer's)
    num_experts: int  # experts per MoE layer (0: dense, or router data not asked)
    router_topk: int  # router entries cached per MoE layer (0: none)
    router_has_probs: bool  # False: router ids only (vLLM)
    tokenizer_fingerprint: str | None  # of the tokenizer saved with the model; None when it has none

    def score(self, batch: TeacherBatch) -> Sequences: ...

    def identity(self) -> dict: ...

    def close(self) -> None:
        """Free the backend's memory now (an engine's GPU memory the next stage needs)."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def padded_draws(keys: torch.Tensor, counts: torch.Tensor, rows: int, width: int, vocab: int) -> dict[str, torch.Tensor]:
    """Sorted unique keys row * vocab + id and their counts as the record's draws: ids and counts
    [rows, width] (ascending ids first, count 0 on padding)."""
    row = keys // vocab
    n_C = torch.bincount(row, minlength=rows)
    col = torch.arange(len(keys), device=keys.device) - (n_C.cumsum(0) - n_C)[row]
    ids_CN = torch.zeros(rows, width, dtype=torch.int32, device=keys.device)
    counts_CN = torch.zeros_like(ids_CN)
    ids_CN[row, col] = (keys % vocab).to(torch.int32)
    counts_CN[row, col] = counts.to(torch.int32)
    return {"draw_ids": ids_CN, "draw_counts": counts_CN}


def parse_router_layers(setting) -> str | tuple[int, ...]:
    """cache.router_layers → 'all', 'last', 'every:N' or a tuple of decoder-layer indices (a syntax check: the
    teacher's MoE layers are known only once it is loaded, see ``router_layers``)."""
    allowed = "allowed: all, last, every:N (every N-th MoE layer, from the first), or a list of MoE layer indices"
    if isinstance(setting, (list, tuple)):
        if not setting or not all(isinstance(x, int) and not isinstance(x, bool) for x in setting):
            raise ConfigError(f"cache.router_layers={list(setting)} is not allowed; {allowed}")
        return tuple(sorted(set(setting)))
    text = str(setting).strip().replace(" ", ":")
    if text in ("all", "last"):
        return text
    every = text.split(":")
    if len(every) == 2 and every[0] == "every" and every[1].isdigit() and int(every[1]) >= 1:
        return f"every:{int(every[1])}"
    raise ConfigError(f"cache.router_layers={setting!r} is not allowed; {allowed}")


def router_layers(setting, moe_layers: list[int]) -> list[int]:
    """The decoder layers whose router data a cache stores, out of the teacher's MoE layers."""
    parsed = parse_router_layers(setting)
    if parsed == "all":
        return list(moe_layers)
    if parsed == "last":
        return list(moe_layers[-1:])
    if isinstance(parsed, str):
        return list(moe_layers[::int(parsed.split(":")[1])])
    outside = [x for x in parsed if x not in moe_layers]
    if outside:
        raise ConfigError(f"cache.router_layers lists {outside}, not MoE layers of the teacher; allowed: "
                          f"{', '.join(map(str, moe_layers))} (or all, last, every:N)")
    return list(parsed)
