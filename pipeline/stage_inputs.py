"""What each stage's output depends on: its input fingerprint, and what a refusal names.

A stage's fingerprint (pipeline/state.py records it) hashes the config sections it reads
(``PARTS``), without the keys that cannot change its output (``NO_EFFECT``: logging, workers,
batch sizes of a forward, kernels, memory knobs), plus inputs that are not config (the data
source's stamp, the prepared data's fingerprints). Changing a key of ``NO_EFFECT`` never
refuses a done stage nor restarts a running one; changing any other key of a part does, and
the refusal names it with its old value, read from the resolved config saved beside the
stage's output (``SAVED``), and its new one.

Every config key is decided here: a key of a section in ``PARTS`` counts unless ``NO_EFFECT``
lists it for that stage; ``run.name``, ``run.root``, ``run.device`` and ``run.inputs_from``
count for no stage (where a run lives and runs, not what it computes; run.inputs_from's
source is checked by identity instead, pipeline/inputs_from.py). The init stage hashes its init
section as it runs it (paths filled from teacher.path and student.path).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from pipeline.config import fingerprint, to_dict
from pipeline.data import sources_stamp
from pipeline.run_paths import data_dir
from pipeline.state import Inputs

# The parts of each stage's fingerprint, in the order they are hashed (the order of the
# fingerprint calls before this module existed, so a run without NO_EFFECT keys keeps its
# fingerprint). A name with a dot is one key; without, a whole section; the last three are not config.
PARTS = {
    "prepare": ("data", "tokenizer_path", "source_stamp"),
    "cache": ("teacher", "cache", "data", "tokenizer_path", "prepared_data"),
    "train": ("student", "train", "run.seed", "data", "teacher", "cache"),
    "evaluate": ("eval", "student", "train", "cache", "data", "teacher"),
    "init": ("init",),
}
STAGES = tuple(PARTS)
READERS = ("train", "evaluate")  # stages that read a cache's decoded values, not its files

# key → the stages whose output it cannot change (why, in the comment).
NO_EFFECT: dict[str, tuple[str, ...]] = {
    "teacher.attn_implementation": STAGES,  # another kernel for the same attention
    "teacher.trust_remote_code": STAGES,  # a permission to load the model, not a setting of it
    "teacher.tensor_parallel_size": STAGES,  # vLLM: GPUs per engine
    "teacher.gpu_memory_utilization": STAGES,  # vLLM: memory
    "teacher.max_num_batched_tokens": STAGES,  # vLLM: scheduling
    "teacher.max_model_len": STAGES,  # vLLM: a capacity; too small is an error, not another cache
    "cache.storage_options": STAGES,  # how to reach the bucket (endpoint, profile), not what it holds
    "cache.batch_size": STAGES,  # sequences per teacher forward: the same values per position
    "cache.extract_chunk_tokens": STAGES,  # positions per extraction step: memory
    "cache.extract_kernel": STAGES,  # native and torch give the same cache (docs/benchmarks.md)
    "cache.compression": READERS,  # the shards' bytes, not their decoded values
    "cache.compression_level": READERS,
    "cache.chunk_tokens": READERS,
    "cache.store": READERS,
    "cache.splits": ("train",),  # train reads cache/ (the train split) only
    "student.attn_implementation": STAGES,
    "student.gradient_checkpointing": STAGES,  # recomputes the same activations
    "train.follow_poll_s": STAGES,  # how often a follower lists, not what it trains on
    "train.follow_timeout_s": STAGES,  # when it gives up waiting
    "train.checkpoint_every": STAGES,  # a resumed run equals the uninterrupted one
    "train.keep_checkpoints": STAGES,
    "train.log_every": STAGES,
    "train.tracker": STAGES,
    "train.num_workers": STAGES,  # DataLoader processes read the same micro-batches in order
    "train.loss_chunk_tokens": STAGES,  # chunked equals unchunked
    "train.allow_uncached_temperature": STAGES,  # without it the run is refused, not different
    "eval.batch_size": STAGES,  # sequences per forward (generation: left-padded, equal up to ties)
    "init.shard_wait_s": ("init",),  # how long a rank waits for the others
}

# The resolved config saved beside each stage's output (relative to the run directory): the old values.
SAVED = {"prepare": ("data/config.yaml",), "cache": ("cache/config.yaml", "cache_eval/config.yaml"),
         "train": ("train/config.yaml",), "evaluate": ("eval/config.yaml",)}  # init: <init.output_dir>/init_config.yaml
NOT_CONFIG = {"source_stamp": "the contents of data.source or data.eval_source (a file's size or modification time)",
              "prepared_data": "the prepared data (data/manifest.json: re-prepared since)"}


TOKENIZER_FROM = (("data", "tokenizer"), ("teacher", "path"), ("student", "path"))  # first set wins


def tokenizer_path(cfg: dict) -> str:
    """PipelineConfig.tokenizer_path() of a resolved config read back as a dict."""
    return next((v for v in (cfg.get(s, {}).get(k) for s, k in TOKENIZER_FROM) if v), "")


def prepared_data(data_run: Path) -> dict | None:
    """The prepared splits' fingerprints: a re-prepared dataset must not reuse an old cache."""
    path = data_dir(data_run) / "manifest.json"
    return {s: v["fingerprint"] for s, v in json.loads(path.read_text())["splits"].items()} if path.exists() else None


def counted(section, name: str, stage: str):
    """A config section with the keys that cannot change ``stage``'s output at their defaults
    (fingerprint() hashes only non-default fields, so they drop out of the hash)."""
    skip = [key.split(".", 1)[1] for key, stages in NO_EFFECT.items() if key.startswith(f"{name}.") and stage in stages]
    defaults = type(section)()
    return dataclasses.replace(section, **{k: getattr(defaults, k) for k in skip})


def part_values(stage: str, cfg, data_run: Path, rule: str) -> list:
    """The values hashed for ``stage``: rule 'current' (NO_EFFECT keys left out) or 'legacy'
    (every key, as kdcache hashed before NO_EFFECT existed)."""
    values = []
    for name in PARTS[stage]:
        if name == "tokenizer_path":
            values.append(cfg.tokenizer_path())
        elif name == "source_stamp":
            values.append(sources_stamp(cfg.data))  # data.source's files, and data.eval_source's when set
        elif name == "prepared_data":
            values.append(prepared_data(data_run))
        elif "." in name:
            section, key = name.split(".")
            values.append(getattr(getattr(cfg, section), key))
        else:
            section = cfg.init_config() if name == "init" else getattr(cfg, name)
            values.append(counted(section, name, stage) if rule == "current" else section)
    return values


def resolved(cfg) -> dict:
    """The config as a dict, its init section as the init stage runs it (paths filled in)."""
    return to_dict(cfg) | {"init": to_dict(cfg.init_config())}


def stage_inputs(stage: str, cfg, run_dir: Path | None = None, data_run: Path | None = None) -> Inputs:
    """The input fingerprint of ``stage`` for ``cfg``, recognising the one an older kdcache recorded,
    and naming the keys that differ from the config saved in ``run_dir`` (default: cfg.run_dir)
    beside its output. ``data_run``: the run whose prepared data the cache stage reads."""
    run_dir = Path(run_dir or cfg.run_dir)
    data_run = Path(data_run or run_dir)
    current = fingerprint(*part_values(stage, cfg, data_run, "current"))
    legacy = fingerprint(*part_values(stage, cfg, data_run, "legacy"))
    return Inputs(current, aliases=(legacy,), changes=lambda: changes(stage, cfg, run_dir))


def flat(resolved: dict, stage: str) -> dict:
    """{dotted key: value} of the config keys that count for ``stage`` (from a resolved config dict)."""
    out = {}
    for name in PARTS[stage]:
        if name == "tokenizer_path":
            out["tokenizer (data.tokenizer, else teacher.path, else student.path)"] = tokenizer_path(resolved)
        elif name in NOT_CONFIG:
            continue
        elif "." in name:
            section, key = name.split(".")
            out[name] = resolved.get(section, {}).get(key)
        else:
            for key, value in resolved.get(name, {}).items():
                if stage not in NO_EFFECT.get(f"{name}.{key}", ()):
                    out[f"{name}.{key}"] = value
    return out


def changed_keys(stage: str, cfg, saved: dict) -> list[str]:
    """'key old → new' for each counted key whose value differs between the saved config and ``cfg``
    (a key the saved config lacks, added since, had its default)."""
    defaults = flat(to_dict(type(cfg)()), stage)
    old = defaults | flat(saved, stage)
    new = flat(resolved(cfg), stage)
    return [f"{key} {_show(old.get(key))} → {_show(value)}" for key, value in new.items() if old.get(key) != value]


def changes(stage: str, cfg, run_dir: Path) -> str:
    """What differs from the config saved beside the stage's output, for a refusal."""
    where = ([Path(cfg.init_config().output_dir) / "init_config.yaml"] if stage == "init"
             else [Path(run_dir) / p for p in SAVED[stage]])
    path = next((p for p in where if p.exists()), None)
    if path is None:
        return f"no saved config beside its output ({where[0]}) to name the keys"
    saved = yaml.safe_load(path.read_text()) or {}
    diff = changed_keys(stage, cfg, {"init": saved} if stage == "init" else saved)
    if diff:
        return f"{', '.join(diff)} (against {path})"
    others = [NOT_CONFIG[name] for name in PARTS[stage] if name in NOT_CONFIG]
    return (f"no key it depends on differs from {path}, so {' or '.join(others)} changed" if others
            else f"no key it depends on differs from {path}")


def _show(value) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
