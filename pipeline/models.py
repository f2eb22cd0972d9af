"""Models and tokenizers from from_pretrained: loading (teacher, student, evaluated checkpoints) and their
fingerprints."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import ConfigError, fingerprint
from pipeline.data import tokenizer_fingerprint

# config keys that say nothing about the function the model computes
_VOLATILE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "attn_implementation",
             "_attn_implementation_autoset", "use_cache", "output_router_logits", "architectures")


def own_tokenizer_fingerprint(path: str) -> str | None:
    """Fingerprint of the tokenizer saved with the model; None when the model directory has none."""
    from transformers import AutoTokenizer

    if not any((Path(path) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return tokenizer_fingerprint(AutoTokenizer.from_pretrained(path))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer  # lazy: transformers costs seconds at CLI start

    if not path:
        raise ConfigError("no tokenizer: set data.tokenizer, teacher.path or student.path")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load tokenizer {path!r}: {str(err).splitlines()[0]}") from None


def student_tokenizer(student_path: str, data_tokenizer_path: str):
    """The student's own tokenizer if its directory has one, else the data's (PipelineConfig.tokenizer_path())."""
    try:
        return load_tokenizer(student_path)
    except ConfigError:
        return load_tokenizer(data_tokenizer_path)


def config_fingerprint(config) -> str:
    return fingerprint({k: v for k, v in config.to_dict().items() if k not in _VOLATILE})


def check_model_dir(path: str) -> None:
    """A model path must exist (unless it reads as a hub id) and, as a directory, hold a saved model."""
    if not Path(path).exists() and ("/" not in path or path.startswith((".", "/"))):
        raise ConfigError(f"model path {path!r} does not exist; pass a model directory or a hub id")
    if Path(path).is_dir() and not (Path(path) / "config.json").exists():
        raise ConfigError(f"model path {path!r} is a directory without config.json; pass a directory written "
                          f"by save_pretrained (or a hub id)")


def load_causal_lm(path: str, dtype: torch.dtype, device: torch.device, attn: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # ValueError: e.g. an unknown model_type or attention kernel
        raise ConfigError(f"cannot load model {path!r}: {str(err).splitlines()[0]}") from None
    return model.to(device).eval()


def teacher_identity(path: str, config) -> dict:
    """The model part of a cache's identity: where it was loaded from and what it computes."""
    return {
        "teacher_path": str(Path(path).resolve()) if Path(path).exists() else path,
        "teacher_config": config_fingerprint(config),
        "teacher_model_type": config.model_type,
    }
