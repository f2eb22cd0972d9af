"""Decoded tokens/s per core through the trainer's real read path: stream → CacheReader → collate.

    OMP_NUM_THREADS=1 python scripts/bench_reader.py [--seqs 48] [--micro 4] [--profile]

Builds a synthetic v1 cache with the project's writer (2,048-token sequences, top-k 64, up to 64
unique draws per position, vocab 151,936, router 8 layers × top-8 of 64 experts) on both stores,
then times ``MicroBatches[seqs]`` (what each DataLoader worker calls: ShardStream.load + collate)
on one thread: a first pass (every chunk decompressed once, as in an epoch) and a second pass with
every chunk already in the reader's block cache (decode + collate alone). Prints a table, then one
JSON line.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cache.codec import Codec
from cache.schema import sequences_from_flat
from cache.stream import CacheSource, ShardStream, StreamPlan
from cache.writer import CacheWriter, finalize
from pipeline.batches import MicroBatches

VOCAB, SEQ, K, LAYERS, R, EXPERTS, DRAWS = 151_936, 2048, 64, 8, 8, 64, 64


def record(rng: np.random.Generator, first_id: int, n_seqs: int) -> dict:
    """A teacher batch record as a backend hands it over (fp32 values, descending top-k)."""
    t = n_seqs * SEQ
    draw_n = rng.integers(1, DRAWS + 1, t)
    lp = np.sort(-rng.exponential(2.0, (t, K)).astype(np.float32), axis=1)[:, ::-1]
    return {"sample_ids": np.arange(first_id, first_id + n_seqs, dtype=np.int64), "seq_lens": np.full(n_seqs, SEQ),
            "input_ids": rng.integers(0, VOCAB, t), "loss_mask": (rng.random(t) < 0.8).astype(np.uint8),
            "target_logprob": -rng.random(t).astype(np.float32), "log_partition": rng.random((t, 1), np.float32),
            "topk_ids": rng.integers(0, VOCAB, (t, K)).astype(np.int32), "topk_logprobs": np.ascontiguousarray(lp),
            "draw_n": draw_n, "draw_ids": rng.integers(0, VOCAB, int(draw_n.sum())).astype(np.int32),
            "draw_counts": rng.integers(1, 5, int(draw_n.sum())).astype(np.int32),
            "router_ids": rng.integers(0, EXPERTS, (t, LAYERS, R)).astype(np.uint8),
            "router_probs": rng.random((t, LAYERS, R)).astype(np.float32)}


def build(cache_dir: Path, store: str, n_seqs: int) -> None:
    identity = {"codec": {"ids": "sorted_delta", "values": "float16"}, "k": K}
    rng = np.random.default_rng(0)
    compression = "zstd" if store == "zarr" else "gzip"
    with CacheWriter(cache_dir, rank=0, identity=identity, store=store, codec=Codec(), shard_tokens=262_144,
                     chunk_rows=4096, compression=compression, level=3, num_experts=EXPERTS) as writer:
        for first in range(0, n_seqs, 8):
            writer.add(sequences_from_flat(record(rng, first, min(8, n_seqs - first))))
    fields = list(record(np.random.default_rng(1), 0, 1))
    finalize(cache_dir, identity, store, fields)


def micro_batches(stream: ShardStream, micro: int) -> list[tuple[int, np.ndarray]]:
    order = stream.order(0)
    return [(0, order[i:i + micro]) for i in range(0, len(order) - micro + 1, micro)]


def time_store(cache_dir: Path, micro: int, profile: bool) -> dict:
    stream = ShardStream(CacheSource(cache_dir), StreamPlan(batch_size=micro, shuffle_window=4096))
    data, mbs = MicroBatches(stream), micro_batches(stream, micro)
    data[mbs[0]]  # warm: shard open + checksum, zarr metadata
    profiler = cProfile.Profile() if profile else None
    start, tokens = time.perf_counter(), 0
    if profiler:
        profiler.enable()
    for seqs in mbs:
        tokens += int(data[seqs]["valid"].sum())  # seqs: (epoch, sequence indices)
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(18)
    seconds = time.perf_counter() - start
    # a second pass: every chunk is in the reader's block cache, so this is decode + collate without the store
    warm = time.perf_counter()
    for seqs in mbs:
        data[seqs]
    warm = time.perf_counter() - warm
    return {"tokens": tokens, "seconds": round(seconds, 3), "tok_per_s": round(tokens / seconds),
            "warm_tok_per_s": round(tokens / warm)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, default=64, help="sequences in the synthetic cache")
    parser.add_argument("--micro", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the timed loop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for store in ("zarr", "hdf5"):
            cache_dir = Path(tmp) / store
            build(cache_dir, store, args.seqs)
            results[store] = time_store(cache_dir, args.micro, args.profile)
    print(f"{'store':<6} {'tokens':>9} {'seconds':>8} {'tok/s/core':>11} {'cached chunks':>14}")
    for store, r in results.items():
        print(f"{store:<6} {r['tokens']:>9,} {r['seconds']:>8.3f} {r['tok_per_s']:>11,} {r['warm_tok_per_s']:>14,}")
    print(json.dumps({"bench": "reader", "seq_len": SEQ, "k": K, "micro": args.micro, "threads": 1, **results}))


if __name__ == "__main__":
    main()
