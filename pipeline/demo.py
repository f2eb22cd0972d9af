"""Tiny real models and real text for the demo and the tests, built with no download.

Text: the docstrings of this Python's own standard library (read with ``ast``). Tokenizer:
a byte-level BPE trained on that text with ``tokenizers``. Models: transformers config
classes with random weights, saved and reloaded through ``from_pretrained``.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

import torch

SPECIALS = {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "bos_token": "<|begin|>"}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|begin|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|begin|>assistant\n{% endif %}"
)


def _docstrings(path: Path) -> list[tuple[str, str]]:
    """(signature-ish name, docstring) for the module, its classes and functions."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                name = getattr(node, "name", path.stem)
                found.append((f"{path.stem}.{name}", doc))
    return found


def stdlib_docstrings(max_docs: int = 4000, min_chars: int = 80) -> list[tuple[str, str]]:
    """Real English text that every Python installation carries, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[tuple[str, str]] = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts or "idlelib" in path.parts:
            continue
        out.extend(pair for pair in _docstrings(path) if len(pair[1]) >= min_chars)
        if len(out) >= max_docs:
            break
    return out[:max_docs]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """A byte-level BPE trained on ``texts``, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(family: str, vocab_size: int, **overrides):
    """A few-layer model of ``family`` (qwen3_moe, qwen2_moe, mixtral, olmoe, qwen3, llama)."""
    from transformers import (LlamaConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3Config,
                              Qwen3MoeConfig)

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                  tie_word_embeddings=False, eos_token_id=0, pad_token_id=1, bos_token_id=2)
    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
    families = {
        "qwen3_moe": (Qwen3MoeConfig, {**moe, "norm_topk_prob": True}),
        "qwen2_moe": (Qwen2MoeConfig, {**moe, "shared_expert_intermediate_size": 32}),
        "mixtral": (MixtralConfig, {"num_local_experts": 8, "num_experts_per_tok": 2}),
        "olmoe": (OlmoeConfig, moe),
        "qwen3": (Qwen3Config, {}),
        "llama": (LlamaConfig, {}),
    }
    cls, extra = families[family]
    return cls(**{**common, **extra, **overrides})


def save_tiny_model(config, out_dir: Path, tokenizer=None, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
