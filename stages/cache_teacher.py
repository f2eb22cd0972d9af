"""Stage (phase one): run the teacher once over the prepared data and cache its signal.

    python run_pipeline.py cache --config configs/demo.yaml
    torchrun --nproc_per_node 8 run_pipeline.py cache --config configs/demo.yaml

Sequences are cut into fixed batches in sample-id order and batch i goes to rank
i % world_size, so every rank count yields the same batches and the same cache. Each rank
writes its own shards (bounded by cache.shard_tokens and cache.shard_bytes); rank 0 merges the
journals into manifest.json last and prints the stage's summary. A killed run resumes at shard
granularity: batches whose sequences a committed shard holds are skipped, and the committed
sequences of a batch split between shards are dropped by the writer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fsspec.core import split_protocol
from fsspec.registry import known_implementations
from tqdm.auto import tqdm

from cache.codec import PRESETS, Codec, frequency_order
from cache.location import Location
from cache.schema import MANIFEST_NAME, Manifest, read_manifest
from cache.shards import STORES, resolve_compression
from cache.writer import CacheWriter, check_identity, committed_sample_ids, committed_shards, finalize
from pipeline import state
from pipeline.config import ConfigError, choice, ranged, to_yaml
from pipeline.distributed import Dist, use_cpu
from pipeline.run_paths import cache_location
from pipeline.splits import load_split
from pipeline.stage_inputs import stage_inputs
from pipeline.teachers.backends import build_teacher
from pipeline.teachers.base import TeacherBatch, parse_router_layers
from pipeline.teachers.extract import TARGETS, ExtractSpec
from pipeline.teachers.native import KERNELS


@dataclass
class CacheConfig:
    preset: str = choice("balanced", tuple(PRESETS))
    """Codec and default shape: compact (draws + top-4, 8-bit), balanced (top-64, 16-bit), exact (top-64, float32); docs/cache_format.md."""
    k: int = ranged(-1, min=-1)
    """Exact top-k head entries stored per position (-1 = the preset's)."""
    targets: str = choice("preset", ("preset", *TARGETS))
    """'topk', 'sampled' (N draws per position, unbiased), both, or 'preset' (the preset's)."""
    num_draws: int = ranged(0, min=0, max=65535)
    """Draws per position for sampled targets (0 = the preset's)."""
    draw_temperature: float = ranged(1.0, above=0.0)
    """Temperature of the distribution the draws come from."""
    temperatures: list[float] = ranged([1.0], above=0.0)
    """Temperatures whose log-partition is cached (tail buckets are exact at these)."""
    router_topk: str = "preset"
    """Router entries per stored MoE layer: 'all', 'routed' (the teacher's experts per token), 'none', an integer k_r, or 'preset'."""
    router_layers: Any = "all"
    """MoE layers whose router data is stored: 'all', 'last', 'every:N' or a list of decoder-layer indices."""
    store: str = choice("zarr", tuple(STORES))
    """Shard format."""
    compression: str = "auto"
    """'auto' (zstd for zarr, gzip for hdf5), zstd, gzip, lzf (hdf5) or none."""
    compression_level: int = 3
    """Compressor level: 1..22 for zstd, 0..9 for gzip (unused by lzf and none)."""
    shard_tokens: int = ranged(262144, min=1)
    """Most tokens per shard (the unit of resume)."""
    shard_bytes: int = ranged(1 << 30, min=1)
    """Most raw record bytes per shard: bounds each rank's writer memory at any k (docs/cache_format.md)."""
    chunk_tokens: int = ranged(4096, min=1)
    """Rows per compressed chunk inside a shard."""
    batch_size: int = ranged(8, min=1)
    """Sequences per teacher forward."""
    extract_chunk_tokens: int = ranged(1024, min=1)
    """Positions per extraction step (bounds the fp32 vocab-sized temporary)."""
    extract_kernel: str = choice("auto", KERNELS)
    """Extraction kernel: 'native' (CPU one-pass C++ kernel, built on first use), 'torch', 'triton' (CUDA, one kernel per row of bf16/fp32 logits: docs/kernels.md), or 'auto' (native on CPU when it builds, torch on a GPU)."""
    seed: int = ranged(0, min=0)
    """Seed of the sampled targets (with each sample id)."""
    splits: list[str] = field(default_factory=lambda: ["train", "eval"])
    """Prepared splits to cache: train → cache/, others → cache_<split>/."""
    dir: str = ""
    """Folder of cache/ and cache_<split>/: '' = the run directory, else a local path or an fsspec URL (s3://bucket/prefix; zarr only)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for a URL cache.dir (e.g. endpoint_url, profile); credentials come from the usual AWS env/config."""

    def validate(self) -> None:
        self.resolve_preset()
        parse_router_layers(self.router_layers)
        if self.k == 0 and "topk" in self.targets:
            raise ConfigError(f"cache.k={self.k} must be positive for cache.targets={self.targets}")
        unknown = [s for s in self.splits if s not in ("train", "eval")]
        if unknown or not self.splits or len(set(self.splits)) < len(self.splits):
            raise ConfigError(f"cache.splits={self.splits} is not allowed; allowed: a non-empty list of train, eval "
                              f"(each at most once)")
        if self.router_topk not in ROUTER_TOPK and not (str(self.router_topk).isdigit() and int(self.router_topk) > 0):
            raise ConfigError(f"cache.router_topk={self.router_topk!r} is not allowed; allowed: "
                              f"{', '.join(ROUTER_TOPK)} or an integer >= 1")
        try:
            compression = resolve_compression(self.store, self.compression)
        except ValueError as err:  # cache/ raises plain ValueError; users get a ConfigError like every key
            raise ConfigError(str(err)) from None
        self.validate_location()
        levels = {"zstd": (1, 22), "gzip": (0, 9)}.get(compression)
        if levels and not levels[0] <= self.compression_level <= levels[1]:
            raise ConfigError(f"cache.compression_level={self.compression_level} is out of range for {compression}; "
                              f"allowed: in [{levels[0]}, {levels[1]}]")

    def resolve_preset(self) -> None:
        """The keys left at 'preset' (-1, 0) take the preset's value (once: the result is what is saved)."""
        p = PRESETS[self.preset]
        self.targets = p.targets if self.targets == "preset" else self.targets
        self.k = p.k if self.k < 0 else self.k
        self.num_draws = p.num_draws if self.num_draws == 0 else self.num_draws
        self.router_topk = p.router_topk if self.router_topk == "preset" else str(self.router_topk)

    def codec(self, vocab_size: int, vocab_order: list[int]) -> Codec:
        return Codec.for_preset(self.preset, vocab_size, vocab_order)

    def validate_location(self) -> None:
        protocol = split_protocol(self.dir)[0] if self.dir else None
        remote = protocol not in (None, "file", "local")
        if remote and protocol not in known_implementations:
            raise ConfigError(f"cache.dir={self.dir!r}: fsspec knows no protocol {protocol!r}; use a local path or "
                              f"a URL such as s3://bucket/prefix")
        if remote and self.store == "hdf5":
            raise ConfigError(f"cache.store=hdf5 needs a local cache.dir, not {self.dir}; use cache.store=zarr for "
                              f"object storage")
        if self.storage_options and not remote:
            raise ConfigError("cache.storage_options is set but cache.dir is not a URL; leave it empty for a local cache")
        bad = [k for k, v in self.storage_options.items() if not isinstance(v, (str, int, float, bool, dict))]
        if bad:
            raise ConfigError(f"cache.storage_options.{bad[0]} must be a string, number, boolean or mapping")


ROUTER_TOPK = ("preset", "all", "routed", "none")


def extract_spec(cfg: CacheConfig, vocab_limit: int) -> ExtractSpec:
    temps = tuple([1.0] + [t for t in cfg.temperatures if t != 1.0])
    return ExtractSpec(k=cfg.k, temperatures=temps, targets=cfg.targets, num_draws=cfg.num_draws,
                       draw_temperature=cfg.draw_temperature, seed=cfg.seed, vocab_limit=vocab_limit,
                       chunk_tokens=cfg.extract_chunk_tokens, router_topk=str(cfg.router_topk),
                       router_layers=parse_router_layers(cfg.router_layers), kernel=cfg.extract_kernel)


def plan_batches(sample_ids: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Row indices of fixed batches in sample-id order (the same for every rank count)."""
    order = np.argsort(sample_ids, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def make_batch(ds, rows: np.ndarray, pad_id: int) -> TeacherBatch:
    records = ds[rows.tolist()]
    seqs, masks = list(records["input_ids"]), list(records["loss_mask"])
    lengths = np.array([len(s) for s in seqs])
    ids = np.full((len(seqs), lengths.max()), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids, dtype=np.uint8)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)], mask[i, : len(m)] = s, m
    return TeacherBatch(torch.as_tensor(records["sample_id"], dtype=torch.long), torch.from_numpy(ids),
                        torch.from_numpy(lengths), torch.from_numpy(mask))


def check_teacher_fits(teacher, data_manifest: dict, spec: ExtractSpec) -> None:
    """Vocabulary, k and tokenizer checks; every split shares the tokenizer, so run once, early."""
    vocab = data_manifest["vocab_size"]
    if teacher.vocab_size < vocab:
        raise ConfigError(f"the tokenizer has {vocab} tokens but the teacher's vocabulary is {teacher.vocab_size}: "
                          f"tokenizer/teacher mismatch; use the teacher's own tokenizer (data.tokenizer)")
    if spec.wants_topk and spec.k > vocab:
        raise ConfigError(f"cache.k={spec.k} is larger than the vocabulary ({vocab}); use cache.k<={vocab}")
    if teacher.tokenizer_fingerprint not in (None, data_manifest["tokenizer"]):
        raise ConfigError("the prepared data used another tokenizer than the teacher's own; "
                          "set data.tokenizer to the teacher's and re-run prepare")


def split_codec(c: CacheConfig, ds, vocab_size: int) -> Codec:
    """The split's codec: the preset's, with the vocabulary ranked by the split's own token counts."""
    import pyarrow.compute as pc

    tokens = pc.list_flatten(ds.data.column("input_ids")).to_numpy()
    return c.codec(vocab_size, frequency_order(tokens, vocab_size))


def identity(cfg, teacher, spec: ExtractSpec, data_manifest: dict, split: str, codec: Codec) -> dict:
    c = cfg.cache
    return {
        **teacher.identity(), "tokenizer": data_manifest["tokenizer"], "vocab_size": data_manifest["vocab_size"],
        "dataset": data_manifest["splits"][split]["fingerprint"], "split": split, "k": c.k if spec.wants_topk else 0,
        "targets": c.targets, "temperatures": list(spec.temperatures),
        "draws": {"n": c.num_draws, "temperature": c.draw_temperature, "seed": c.seed} if spec.wants_draws else None,
        "codec": codec.to_dict(), "store": c.store,
    }


def cache_split(cfg, teacher, spec: ExtractSpec, split: str, dist: Dist) -> Manifest | None:
    ds, data_manifest = load_split(cfg.run_dir, split, allow_empty=True)  # an empty split is not cached
    out_dir = cache_location(cfg, split)
    if len(ds) == 0:
        return None
    codec = split_codec(cfg.cache, ds, data_manifest["vocab_size"])
    ident = identity(cfg, teacher, spec, data_manifest, split, codec)
    out_dir.makedirs()
    check_identity(out_dir, ident)
    if out_dir.exists(MANIFEST_NAME) and read_manifest(out_dir).identity == ident:
        return read_manifest(out_dir)

    if dist.is_main:  # beside the output from the start: a refusal names the keys changed since (stage_inputs)
        save_cache_config(cfg, out_dir)
    c = cfg.cache
    done = committed_sample_ids(out_dir, c.store)
    sample_ids = np.asarray(ds["sample_id"])
    mine = plan_batches(sample_ids, c.batch_size)[dist.rank::dist.world_size]
    todo = [rows for rows in mine if not all(int(s) in done for s in sample_ids[rows])]
    writer = CacheWriter(out_dir, rank=dist.rank, identity=ident, store=c.store, codec=codec,
                         shard_tokens=c.shard_tokens, shard_bytes=c.shard_bytes, chunk_tokens=c.chunk_tokens,
                         compression=resolve_compression(c.store, c.compression), level=c.compression_level,
                         num_experts=teacher.num_experts, skip=done, world_size=dist.world_size)
    run_batches(teacher, ds, todo, writer, dist, split)
    dist.barrier()
    if dist.is_main:
        finalize(out_dir, ident, c.store, sorted(cached_fields(spec, teacher)))
        save_cache_config(cfg, out_dir)
    dist.barrier()
    return read_manifest(out_dir)


def save_cache_config(cfg, location: Location) -> None:
    location.write_whole("config.yaml", to_yaml(cfg).encode())


def cached_fields(spec: ExtractSpec, teacher) -> set[str]:
    out = {"input_ids", "loss_mask", "seq_offsets", "sample_ids", "target_logprob", "log_partition"}
    if spec.wants_topk:
        out |= {"topk_ids", "topk_logprobs"}
    if len(spec.temperatures) == 1:
        out.remove("log_partition")  # the gauge log Z_1 = 0 leaves nothing to store at tau = 1 alone
    if spec.wants_draws:
        out |= {"draw_n", "seq_draw_offsets", "draw_ids", "draw_counts", "draw_logprobs"}
    if teacher.router_topk:
        out |= {"router_ids", "router_probs"} if teacher.router_has_probs else {"router_ids"}
    return out


def run_batches(teacher, ds, todo: list[np.ndarray], writer: CacheWriter, dist: Dist, split: str) -> None:
    lengths = np.array([len(x) for x in ds["input_ids"]])
    total = int(sum(lengths[rows].sum() for rows in todo))
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"cache {split} (rank 0 of {dist.world_size})",
               disable=not dist.is_main, smoothing=0.1)
    with writer:
        for rows in todo:
            batch = make_batch(ds, rows, pad_id=0)  # padding is masked out; any id will do
            out = teacher.score(batch)
            writer.add(out)
            bar.update(int(batch.lengths.sum()))
    bar.close()


def committed_outputs(cache_dirs: list[Location]) -> list[Location]:
    """What a cache run finished: manifests and the journalled shards still on disk (a journal, or one
    whose shards are gone, is no finished work: a re-run with other inputs starts afresh)."""
    return [p for d in cache_dirs for p in [d / MANIFEST_NAME, *(d / s.name for s in committed_shards(d))]]


def set_aside_outputs(locations: list[Location], force: bool) -> list[Path]:
    """The cache folders --force may set aside (renamed): local ones. An object store cannot rename, so
    --force over an existing remote cache is refused rather than deleting anything."""
    remote = [loc for loc in locations if not loc.local]
    if force and any(loc.exists(MANIFEST_NAME) or loc.names("journal/rank*.json") for loc in remote):
        raise ConfigError(f"--force cannot set {remote[0]} aside (an object store has no rename); delete it "
                          f"yourself or choose another cache.dir")
    return [loc.path() for loc in locations if loc.local]


def run(cfg, force: bool = False) -> dict[str, Manifest]:
    dist = Dist.from_env(cpu=use_cpu(cfg.run.device))  # the device the teacher runs on
    inputs = stage_inputs("cache", cfg)  # the prepared data is an input too (pipeline/stage_inputs.py)
    locations = [cache_location(cfg, s) for s in cfg.cache.splits]
    outputs = set_aside_outputs(locations, force)
    if not state.begin_on_all_ranks(cfg.run_dir, "cache", inputs, outputs, force, dist.is_main, dist.barrier,
                                    defer=True, committed=committed_outputs(locations)):
        return {s: read_manifest(loc) for s, loc in zip(cfg.cache.splits, locations) if loc.exists(MANIFEST_NAME)}
    _, data_manifest = load_split(cfg.run_dir, "train")
    spec = extract_spec(cfg.cache, vocab_limit=data_manifest["vocab_size"])
    # vLLM sizes its KV cache by max_model_len; 0 means the prepared length (+1 for the one generated token)
    teacher_cfg = replace(cfg.teacher, max_model_len=cfg.teacher.max_model_len or cfg.data.max_length + 1)
    teacher = build_teacher(teacher_cfg, spec, dist.device)
    check_teacher_fits(teacher, data_manifest, spec)  # before the state records a run with these inputs
    if dist.is_main:
        state.write_state(cfg.run_dir, "cache", "running", inputs, **where(cfg))  # sets old outputs aside if --force
    dist.barrier()  # no rank looks at the cache directories before that
    start = time.time()
    manifests = {s: m for s in cfg.cache.splits if (m := cache_split(cfg, teacher, spec, s, dist)) is not None}
    teacher.close()  # an engine (vLLM) frees its memory now, not whenever its object is collected
    if dist.is_main:
        tokens = {s: m.n_tokens for s, m in manifests.items()}
        state.write_state(cfg.run_dir, "cache", "done", inputs, tokens=tokens, seconds=round(time.time() - start, 1),
                          **where(cfg))
        print(summary(manifests, data_manifest, spec, time.time() - start), flush=True)
    return manifests


def where(cfg) -> dict:
    """cache.dir in the stage's record, when set: `status` finds the caches there."""
    return {"cache_dir": cfg.cache.dir} if cfg.cache.dir else {}


def summary(manifests: dict[str, Manifest], data_manifest: dict, spec: ExtractSpec, seconds: float) -> str:
    """The stage's closing paragraph: per split sequences, tokens, shards and bytes per token on disk."""
    parts = []
    for split, m in manifests.items():
        size = sum(s.nbytes for s in m.shards)
        parts.append(f"{split} {m.n_seqs:,} sequences, {m.n_tokens:,} tokens in {len(m.shards)} shards "
                     f"({size / 2**20:,.1f} MiB, {size / max(m.n_tokens, 1):,.1f} bytes/token)")
    what = " + ".join([f"top-{spec.k}"] * spec.wants_topk + [f"{spec.num_draws} draws"] * spec.wants_draws)
    cut = data_manifest.get("sequences_cut", {}).get("truncated", 0)
    return (f"cache: {'; '.join(parts) or 'nothing to cache'}; {what} per position; {cut} sequences were truncated "
            f"to data.max_length by prepare; {seconds:,.1f} s")
