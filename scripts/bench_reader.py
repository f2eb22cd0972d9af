"""Decoded tokens/s per core through the trainer's real read path: stream → CacheReader → collate.

    OMP_NUM_THREADS=1 python scripts/bench_reader.py [--seqs 64] [--micro 4] [--preset compact] [--router] [--profile]

Builds a format-v2 cache with the project's writer from the real-shape synthetic teacher
(pipeline/teachers/synthetic.py: vocab 151,936, 2,048-token sequences; the preset's head and draws;
with --router, 48 MoE layers × the preset's router entries of 128 experts) on both stores. Generating
that signal is slow (a softmax over 152k per position), so GENERATED sequences are made and repeated under
new sample ids (each repeat is 16k rows away, more than a 4,096-row chunk: the compressor sees no repeat
inside a chunk). Then it times ``MicroBatches[(epoch, seqs)]`` (what each DataLoader worker calls:
ShardStream.load + collate) on one thread: a first pass (each shard array decompressed once, as in an
epoch) and a second pass with everything in the reader's block cache (decode + collate alone). Prints a
table, then one JSON line.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cache.codec import PRESETS, Codec, frequency_order  # noqa: E402
from cache.schema import sequences_from_flat  # noqa: E402
from cache.stream import CacheSource, ShardStream, StreamPlan  # noqa: E402
from cache.writer import CacheWriter, finalize  # noqa: E402
from pipeline.batches import MicroBatches  # noqa: E402
from pipeline.teachers.synthetic import EXPERTS, ROUTED, SyntheticTeacher, teacher_record  # noqa: E402

SEQ, GENERATED = 2048, 8
K, VOCAB, LAYERS, R, DRAWS = 64, 151_936, 8, 8, 64  # the random record's shape (scripts/bench_s3.py uses it)


def record(rng: np.random.Generator, first_id: int, n_seqs: int) -> dict:
    """A random teacher batch record (fp32 values, descending top-k; not a teacher's statistics): cheap to
    make at any size, for benchmarks that time store I/O rather than the codec (scripts/bench_s3.py)."""
    t = n_seqs * SEQ
    draw_n = rng.integers(1, DRAWS + 1, t)
    d = int(draw_n.sum())
    lp = np.sort(-rng.exponential(2.0, (t, K)).astype(np.float32), axis=1)[:, ::-1]
    return {"sample_ids": np.arange(first_id, first_id + n_seqs, dtype=np.int64), "seq_lens": np.full(n_seqs, SEQ),
            "input_ids": rng.integers(0, VOCAB, t), "loss_mask": (rng.random(t) < 0.8).astype(np.uint8),
            "target_logprob": -rng.random(t).astype(np.float32), "log_partition": np.zeros((t, 1), np.float32),
            "topk_ids": (np.arange(K) * (VOCAB // K) + rng.integers(0, VOCAB // K, (t, K))).astype(np.int32),  # distinct
            "topk_logprobs": np.ascontiguousarray(lp), "draw_n": draw_n,
            "draw_ids": rng.integers(0, VOCAB, d).astype(np.int32), "draw_counts": rng.integers(1, 5, d).astype(np.int32),
            "draw_logprobs": -rng.exponential(3.0, d).astype(np.float32),
            "router_ids": (np.arange(R) * (EXPERTS // R) + rng.integers(0, EXPERTS // R, (t, LAYERS, R))).astype(np.uint8),
            "router_probs": rng.random((t, LAYERS, R)).astype(np.float32)}


def records(preset: str, router: bool) -> list[dict]:
    p = PRESETS[preset]
    k = p.k if "topk" in p.targets else 0
    draws = p.num_draws if "sampled" in p.targets else 0
    topk = (EXPERTS if p.router_topk == "all" else ROUTED) if router else 0
    return [teacher_record(SyntheticTeacher(), 1, SEQ, k=k, num_draws=draws, router_topk=topk, first_sample=i)
            for i in range(GENERATED)]


def build(cache_dir: Path, store: str, n_seqs: int, base: list[dict], preset: str) -> None:
    codec = Codec.for_preset(preset, 151_936, frequency_order(np.concatenate([r["input_ids"] for r in base]), 151_936))
    identity = {"codec": codec.to_dict(), "k": PRESETS[preset].k}
    compression = "zstd" if store == "zarr" else "gzip"
    with CacheWriter(cache_dir, rank=0, identity=identity, store=store, codec=codec, shard_tokens=262_144,
                     chunk_tokens=4096, compression=compression, level=3, num_experts=EXPERTS) as writer:
        for i in range(n_seqs):
            rec = {k: v.copy() for k, v in base[i % len(base)].items()}
            rec["sample_ids"] = np.array([i], np.int64)
            writer.add(sequences_from_flat(rec))
    finalize(cache_dir, identity, store, sorted(base[0]))


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
    # a second pass: everything is in the reader's block cache, so this is decode + collate without the store
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
    parser.add_argument("--preset", default="compact", choices=tuple(PRESETS))
    parser.add_argument("--router", action="store_true", help="store the preset's router entries of 48 layers too")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the timed loop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    base = records(args.preset, args.router)
    with tempfile.TemporaryDirectory() as tmp:
        for store in ("zarr", "hdf5"):
            cache_dir = Path(tmp) / store
            build(cache_dir, store, args.seqs, base, args.preset)
            results[store] = time_store(cache_dir, args.micro, args.profile)
    print(f"{'store':<6} {'tokens':>9} {'seconds':>8} {'tok/s/core':>11} {'cached chunks':>14}")
    for store, r in results.items():
        print(f"{store:<6} {r['tokens']:>9,} {r['seconds']:>8.3f} {r['tok_per_s']:>11,} {r['warm_tok_per_s']:>14,}")
    print(json.dumps({"bench": "reader", "preset": args.preset, "router": args.router, "seq_len": SEQ,
                      "micro": args.micro, "threads": 1, **results}))


if __name__ == "__main__":
    main()
