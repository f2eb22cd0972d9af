"""A cache on a local disk vs on an S3 API (moto's server on 127.0.0.1): write, and read through the
trainer's path (ShardStream.load + collate) on the bucket with and without the reader's
2-shard prefetch (a local cache opens shards on demand).

    OMP_NUM_THREADS=1 python scripts/bench_s3.py [--seqs 64] [--shard-seqs 8] [--micro 4]

The synthetic records are scripts/bench_reader.py's (2,048-token sequences, top-k 64, draws, router).
moto answers from this machine's memory, in this process: a request costs its HTTP round trip and
moto's own Python, not a real network's latency or bandwidth, so the figures bound the client-side
cost (encode in memory, upload, fetch, hash) and show whether prefetch hides the fetch; they are
not S3 throughput. ``--latency-ms`` adds a (simulated, labelled) wait to every whole-shard fetch, the
part of a real transfer that prefetch can hide. Prints a table, then one JSON line.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import logging
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reader import EXPERTS, K, record  # noqa: E402

from cache.codec import Codec  # noqa: E402
from cache.location import Location  # noqa: E402
from cache.schema import sequences_from_flat  # noqa: E402
from cache.stream import CacheSource, ShardStream, StreamPlan  # noqa: E402
from cache.writer import CacheWriter, finalize  # noqa: E402
from pipeline.batches import MicroBatches  # noqa: E402


def start_s3() -> object:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    return server


def write(location: Location, n_seqs: int, shard_seqs: int) -> float:
    identity = {"codec": Codec().to_dict(), "k": K}
    rng = np.random.default_rng(0)
    records = [sequences_from_flat(record(rng, first, 8)) for first in range(0, n_seqs, 8)]
    start = time.perf_counter()
    with CacheWriter(location, rank=0, identity=identity, store="zarr", codec=Codec(), shard_tokens=shard_seqs * 2048,
                     chunk_tokens=4096, compression="zstd", level=3, num_experts=EXPERTS) as writer:
        for batch in records:
            writer.add(batch)
    finalize(location, identity, "zarr", list(record(np.random.default_rng(1), 0, 1)))
    return time.perf_counter() - start


def read(location: Location, micro: int, prefetch: bool) -> tuple[int, float]:
    """One epoch in plan order (shards permuted, windows shuffled), as a DataLoader worker reads it."""
    stream = ShardStream(CacheSource(location), StreamPlan(batch_size=micro, shuffle_window=16, seed=0))
    if not prefetch:
        stream.source.prefetch = lambda shards: None
    data, order = MicroBatches(stream), stream.order(0)
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(order) - micro + 1, micro):
        tokens += int(data[(0, order[i:i + micro])]["valid"].sum())
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, default=64, help="sequences in the synthetic cache")
    parser.add_argument("--shard-seqs", type=int, default=8, help="sequences per shard")
    parser.add_argument("--micro", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="simulated: sleep this long in every whole-shard fetch (a network transfer moto lacks)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.latency_ms:
        real_fetch = Location.fetch

        def slow_fetch(self, name):
            time.sleep(args.latency_ms / 1000)  # sleeping releases the GIL, as waiting on a socket does
            return real_fetch(self, name)

        Location.fetch = slow_fetch
    server = start_s3()
    import fsspec

    fsspec.filesystem("s3").mkdir("bench")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        places = {"local": Location(Path(tmp) / "cache"), "s3 (moto)": Location("s3://bench/cache")}
        for where, location in places.items():
            seconds = write(location, args.seqs, args.shard_seqs)
            for prefetch in ((True, False) if not location.local else (True,)):  # local: opened on demand
                tokens, read_s = read(location, args.micro, prefetch)
                name = where if location.local else f"{where}, prefetch {'on' if prefetch else 'off'}"
                rows[name] = {
                    "write_s": round(seconds, 3), "tokens": tokens, "read_s": round(read_s, 3),
                    "tok_per_s": round(tokens / read_s)}
    server.stop()
    base = rows["local"]["tok_per_s"]
    print(f"{'where':<24} {'write s':>8} {'read s':>8} {'tok/s':>9} {'vs local':>9}")
    for name, r in rows.items():
        print(f"{name:<24} {r['write_s']:>8.2f} {r['read_s']:>8.2f} {r['tok_per_s']:>9,} {r['tok_per_s'] / base:>9.2f}")
    print(json.dumps({"bench": "s3", "latency_ms_simulated": args.latency_ms, "seqs": args.seqs, "shard_seqs": args.shard_seqs, "micro": args.micro,
                      "machine": "Intel Xeon, 2 shared cores, no GPU", "date": "2026-12-01", **rows}))


if __name__ == "__main__":
    main()
