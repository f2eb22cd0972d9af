"""Raw records → tokenized sequences with stable sample ids and next-token loss masks.

``loss_mask[i] = 1`` means "the target at position i, token i+1, is trained on": for text
every position but the last; for prompt/response data only positions whose next token
belongs to the response. This is the same convention as the cache's ``loss_mask``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, choice, ranged

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}


@dataclass
class DataConfig:
    source: str = ""
    """A local .jsonl/.json/.parquet/.txt file or directory, or a dataset hub id ('' = the demo's text)."""
    subset: str = ""
    """Hub dataset configuration name, if it has several."""
    split: str = "train"
    """Hub dataset split to read."""
    format: str = choice("auto", ("auto", "json", "parquet", "text"))
    """File format; 'auto' picks it from the extension."""
    mode: str = choice("auto", ("auto", "text", "prompt_response"))
    """'text': train on every token; 'prompt_response': train on response tokens only."""
    text_field: str = "text"
    """Column holding plain text."""
    prompt_field: str = "prompt"
    """Column holding the prompt (prompt/response data)."""
    response_field: str = "response"
    """Column holding the response (prompt/response data)."""
    chat_template: bool = False
    """Render prompt/response pairs with the tokenizer's chat template."""
    response_separator: str = " "
    """Put between prompt and response unless either has whitespace there (docs/data.md; not with chat_template)."""
    tokenizer: str = ""
    """Tokenizer path or hub id ('' = the teacher's)."""
    max_length: int = ranged(512, min=2)
    """Tokens per sequence; longer ones are truncated (or split, with packing)."""
    packing: bool = False
    """Concatenate documents (each ending in EOS) and cut the stream into max_length sequences."""
    add_eos: bool = True
    """Append the tokenizer's EOS token to every document."""
    eval_fraction: float = ranged(0.05, min=0.0, below=1.0)
    """Share of sequences held out for evaluate, chosen by a hash of the sample id (unused with eval_source)."""
    eval_source: str = ""
    """A separate eval set, read like source: all its records are the eval split ('' = the hash split)."""
    max_samples: int = ranged(0, min=0)
    """Read at most this many records (0 = all)."""


def sources_stamp(cfg: DataConfig) -> list:
    """``source_stamp`` of data.source, plus data.eval_source's when set (so a run without one keeps its stamp)."""
    return source_stamp(cfg.source) + (source_stamp(cfg.eval_source) if cfg.eval_source else [])


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's content (vocabulary and special tokens), not of its file."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:16]


def _local_files(path: Path) -> list[str]:
    if path.is_file():
        return [str(path)]
    files = sorted(str(p) for p in path.rglob("*") if p.suffix in FORMATS)
    if not files:
        raise ConfigError(f"data.source={path} holds no {'/'.join(FORMATS)} files")
    return files


def source_stamp(source: str) -> list:
    """(file, size, mtime) of each local source file, so an edited file is a changed input; [] for a hub id."""
    path = Path(source)
    if not path.exists():
        return []
    return [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in _local_files(path)]


def load_records(cfg: DataConfig, key: str = "source"):
    """The raw dataset of ``data.<key>`` (source or eval_source): local files or a hub id, through ``datasets``."""
    import datasets

    source = getattr(cfg, key)
    path = Path(source)
    if path.exists():
        files = _local_files(path)
        fmt = cfg.format if cfg.format != "auto" else FORMATS.get(Path(files[0]).suffix)
        if fmt is None:
            raise ConfigError(f"cannot tell the format of {files[0]}; set data.format=json|parquet|text")
        if all(os.stat(f).st_size == 0 for f in files):
            raise ConfigError(f"data.{key}={path} is empty (0 bytes); point it at a file with records")
        try:
            ds = datasets.load_dataset(fmt, data_files=files, split="train")
        except Exception as err:  # datasets raises StopIteration, ValueError, DatasetGenerationError...: one line
            raise ConfigError(f"cannot read data.{key}={path} as {fmt} ({type(err).__name__}: "
                              f"{(str(err).splitlines() or [''])[0][:200]}); check the file or set data.format") from None
    else:
        try:
            ds = datasets.load_dataset(source, cfg.subset or None, split=cfg.split)
        except Exception as err:  # the hub raises many types; the user needs one line
            raise ConfigError(
                f"data.{key}={source!r} is not a local file and could not be loaded as a dataset "
                f"hub id ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
            ) from None
    if len(ds) == 0:
        raise ConfigError(f"data.{key}={source!r} holds no records; point it at a dataset with records")
    return ds.select(range(min(cfg.max_samples, len(ds)))) if cfg.max_samples else ds


def resolve_mode(cfg: DataConfig, columns: list[str]) -> str:
    has_text = cfg.text_field in columns
    has_pr = cfg.prompt_field in columns and cfg.response_field in columns
    mode = cfg.mode if cfg.mode != "auto" else ("text" if has_text else "prompt_response" if has_pr else "")
    if (mode == "text" and not has_text) or (mode == "prompt_response" and not has_pr) or not mode:
        raise ConfigError(
            f"the dataset has columns {columns}; it needs a '{cfg.text_field}' field (data.text_field) "
            f"or '{cfg.prompt_field}'/'{cfg.response_field}' fields (data.prompt_field/data.response_field)"
        )
    return mode


def _render_pair(tokenizer, cfg: DataConfig, prompt: str, response: str) -> tuple[str, str]:
    if not cfg.chat_template:
        return prompt, join_response(cfg, prompt, response)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.chat_template=true but the tokenizer has no chat template; set it to false")
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        raise ConfigError("the chat template does not render the prompt as a prefix of the conversation")
    return head, full[len(head):]


def join_response(cfg: DataConfig, prompt: str, response: str) -> str:
    """The response as it follows the prompt: after data.response_separator unless the prompt already
    ends, or the response starts, with whitespace (or either is empty), so 'where to' + 'get' reads
    'where to get'."""
    if not prompt or not response or prompt[-1].isspace() or response[0].isspace():
        return response
    return cfg.response_separator + response


def tokenize_batch(tokenizer, cfg: DataConfig, mode: str, rows: dict[str, list]) -> list[tuple[list[int], list[int]]]:
    """Per record: (token ids, target mask) where target mask[j] = 1 if token j is trained on.

    A pair is the prompt's tokens then the joined response's (``join_response``), tokenized apart so
    the trained part starts exactly at the response."""
    eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
    if mode == "text":
        ids = tokenizer(rows[cfg.text_field], add_special_tokens=False)["input_ids"]
        return [(x + eos, [1] * (len(x) + len(eos))) for x in ids]
    pairs = [_render_pair(tokenizer, cfg, p, r) for p, r in zip(rows[cfg.prompt_field], rows[cfg.response_field])]
    heads = tokenizer([p for p, _ in pairs], add_special_tokens=not cfg.chat_template)["input_ids"]
    tails = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    return [(h + t + eos, [0] * len(h) + [1] * (len(t) + len(eos))) for h, t in zip(heads, tails)]


def to_position_mask(target_mask: np.ndarray) -> np.ndarray:
    """Token-level 'is a target' → position-level 'predicts a target' (the cache convention)."""
    out = np.zeros(len(target_mask), dtype=np.uint8)
    out[:-1] = target_mask[1:]
    return out


def pack(docs, max_length: int):
    """Concatenate (ids, target mask) documents and yield full max_length pieces (and the rest)."""
    buf_ids: list[int] = []
    buf_mask: list[int] = []
    for ids, mask in docs:
        buf_ids.extend(ids)
        buf_mask.extend(mask)
        while len(buf_ids) >= max_length:
            yield buf_ids[:max_length], buf_mask[:max_length]
            buf_ids, buf_mask = buf_ids[max_length:], buf_mask[max_length:]
    if len(buf_ids) >= 2:
        yield buf_ids, buf_mask


def is_eval(sample_id: int, fraction: float) -> bool:
    """A stable pseudo-random split by sample id (Knuth's multiplicative hash)."""
    return ((sample_id * 2654435761) % 2**32) / 2**32 < fraction


def sequences_fingerprint(sample_ids: list[int], input_ids: list[np.ndarray], loss_mask: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for sid, ids, mask in zip(sample_ids, input_ids, loss_mask):
        digest.update(np.int64(sid).tobytes())
        digest.update(np.asarray(ids, dtype=np.int32).tobytes())
        digest.update(np.asarray(mask, dtype=np.uint8).tobytes())
    return digest.hexdigest()[:16]
