"""Stage: dataset → tokenized sequences with sample ids and loss masks.

    python run_pipeline.py prepare --config configs/demo.yaml

Writes ``runs/<name>/data/{train,eval}`` (datasets on disk: sample_id, input_ids,
loss_mask) and ``data/manifest.json`` with each split's fingerprint and size.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cache.schema import write_json_atomic
from pipeline import state
from pipeline.config import ConfigError, save_config
from pipeline.data import (is_eval, load_records, pack, resolve_mode, to_position_mask, tokenize_batch,
                           tokenizer_fingerprint)
from pipeline.models import load_tokenizer
from pipeline.run_paths import data_dir
from pipeline.splits import SPLITS, save_split
from pipeline.stage_inputs import stage_inputs


def documents(records, tokenizer, cfg, mode: str):
    """(token ids, target mask) per record, in record order, with the record index."""
    batch_size = 1000
    for start in tqdm(range(0, len(records), batch_size), desc="tokenize", unit="batch", leave=False):
        rows = records[start:start + batch_size]
        for offset, doc in enumerate(tokenize_batch(tokenizer, cfg, mode, rows)):
            yield start + offset, doc


def truncated(docs, max_length: int, counts: dict):
    """Each document cut to max_length tokens, counting the ones that lost tokens."""
    for i, (ids, mask) in docs:
        counts["truncated"] += len(ids) > max_length
        yield i, (ids[:max_length], mask[:max_length])


def sequences(records, tokenizer, cfg, mode: str, counts: dict):
    """(sample id, ids, position loss mask); the id is the record index, or the piece index when packing.

    ``counts`` gets 'truncated' (documents cut at max_length) and 'dropped' (under 2 tokens).
    """
    docs = documents(records, tokenizer, cfg, mode)
    if cfg.packing:
        pieces = enumerate(pack((doc for _, doc in docs), cfg.max_length))
    else:
        pieces = truncated(docs, cfg.max_length, counts)
    for sample_id, (ids, mask) in pieces:
        if len(ids) < 2:
            counts["dropped"] += 1
            continue
        yield sample_id, np.asarray(ids, np.int32), to_position_mask(np.asarray(mask, np.uint8))


def split_sequences(records, held_out, tokenizer, cfg, mode: str, counts: dict):
    """(split, sample id, ids, position loss mask): the eval split is chosen by a hash of the sample id,
    or, with data.eval_source (``held_out``), is every sequence of it (ids: its own record indices)."""
    for sample_id, ids, mask in sequences(records, tokenizer, cfg, mode, counts):
        yield ("eval" if held_out is None and is_eval(sample_id, cfg.eval_fraction) else "train"), sample_id, ids, mask
    if held_out is not None:
        for sample_id, ids, mask in sequences(held_out, tokenizer, cfg, mode, counts):
            yield "eval", sample_id, ids, mask


def summary(report: str, manifest: dict, out_dir: Path) -> str:
    """The stage's closing paragraph: ``check_counts``'s line with tokens and bytes per token on disk."""
    splits = manifest["splits"].values()
    tokens, trained = sum(s["tokens"] for s in splits), sum(s["trained_tokens"] for s in splits)
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    head, rest = report.split("; ", 1)
    source = " from data.eval_source" if manifest["eval_from"] == "data.eval_source" else ""
    return (f"{head[:-1]}{source}), {tokens:,} tokens ({trained:,} trained); {rest}; "
            f"{size / max(tokens, 1):,.1f} bytes/token on disk ({out_dir})")


def check_counts(data_cfg, rows: dict, counts: dict) -> str:
    """Refuse data with nothing to train on; else the one line that says what prepare kept and cut."""
    if not rows["train"]["sample_id"]:
        raise ConfigError(f"data.source={data_cfg.source!r} gave no sequence of at least 2 tokens")
    untrained = {s: sum(int(m.sum()) == 0 for m in rows[s]["loss_mask"]) for s in SPLITS}
    counts["no_trained_position"] = sum(untrained.values())
    n_train, n_eval = (len(rows[s]["sample_id"]) for s in SPLITS)
    cut = f"{counts['truncated']} truncated to data.max_length={data_cfg.max_length}"
    if untrained["train"] == n_train:
        raise ConfigError(f"no train sequence keeps a trained position ({cut}; the trained part lies beyond it); "
                          f"raise data.max_length or set data.packing=true")
    return (f"prepare: {n_train + n_eval} sequences (train {n_train}, eval {n_eval}); {cut}; "
            f"{counts['no_trained_position']} with no trained position; {counts['dropped']} dropped (under 2 tokens)")


def run(cfg, force: bool = False) -> dict:
    run_dir, data_cfg = cfg.run_dir, cfg.data
    tok_path = cfg.tokenizer_path()
    inputs = stage_inputs("prepare", cfg)
    out_dir = data_dir(run_dir)
    if not state.begin(run_dir, "prepare", inputs, [out_dir], force, defer=True, committed=[out_dir / "manifest.json"]):
        return json.loads((out_dir / "manifest.json").read_text())
    tokenizer = load_tokenizer(tok_path)
    records = load_records(data_cfg)
    mode = resolve_mode(data_cfg, list(records.column_names))
    held_out = load_records(data_cfg, "eval_source") if data_cfg.eval_source else None
    if held_out is not None:  # the eval file must hold the fields of the train data's mode
        resolve_mode(replace(data_cfg, mode=mode), list(held_out.column_names))

    rows = {split: {"sample_id": [], "input_ids": [], "loss_mask": []} for split in SPLITS}
    counts = {"truncated": 0, "dropped": 0}
    for split, sample_id, ids, mask in split_sequences(records, held_out, tokenizer, data_cfg, mode, counts):
        for key, value in zip(("sample_id", "input_ids", "loss_mask"), (sample_id, ids, mask)):
            rows[split][key].append(value)
    report = check_counts(data_cfg, rows, counts)
    state.write_state(run_dir, "prepare", "running", inputs)  # only now: a failed check leaves no state

    manifest = {"mode": mode, "tokenizer": tokenizer_fingerprint(tokenizer), "tokenizer_path": tok_path,
                "vocab_size": len(tokenizer), "sequences_cut": counts,
                "eval_from": "data.eval_source" if held_out is not None else "hash of the sample id",
                "splits": {s: save_split(out_dir / s, rows[s]) for s in SPLITS}}
    report = summary(report, manifest, out_dir)
    save_config(cfg, out_dir / "config.yaml")
    write_json_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=1))
    state.write_state(run_dir, "prepare", "done", inputs, **{s: manifest["splits"][s]["sequences"] for s in SPLITS})
    if int(os.environ.get("RANK", "0")) == 0:  # one summary under a launcher too
        print(report, flush=True)
    return manifest
