"""Loading causal LMs (teacher, student, evaluated checkpoints) through from_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import ConfigError


def load_causal_lm(path: str, dtype: torch.dtype, device: torch.device, attn: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    if not Path(path).exists() and ("/" not in path or path.startswith((".", "/"))):
        raise ConfigError(f"model path {path!r} does not exist; pass a model directory or a hub id")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                     trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ConfigError(f"cannot load model {path!r}: {str(err).splitlines()[0]}") from None
    return model.to(device).eval()
