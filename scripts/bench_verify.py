"""What checking a shard's bytes costs the training reader, against decoding the shard.

    python scripts/bench_verify.py                     # demo shape and a production-sized shard, both stores
    python scripts/bench_verify.py --shape large --store zarr --repeats 5

A synthetic shard of each shape is written through the real ``commit_shard``, then timed
(medians, warm page cache): decoding every array once (what an epoch of training reads, the
reader's chunk cache holding each decoded chunk), sha256 over the whole shard (what
``CacheReader`` checks before a shard's first read), and, for the per-chunk alternative,
sha256 and zlib.crc32 over each stored chunk separately (Zarr: one file per chunk).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.codec import Codec  # noqa: E402
from cache.reader import CacheReader  # noqa: E402
from cache.schema import Manifest, sequences_from_flat, write_manifest  # noqa: E402
from cache.shards import checksum, commit_shard, resolve_compression, shard_name  # noqa: E402
from cache.writer import assemble_shard  # noqa: E402

# tokens, k, unique draws per position, temperatures, MoE layers, router entries, experts, chunk rows
SHAPES = {"demo": (65536, 32, 20, 2, 2, 8, 8, 4096),  # configs/demo.yaml on the tiny Qwen3-MoE teacher
          "large": (262144, 64, 16, 2, 48, 8, 128, 4096)}  # cache defaults, Qwen3-30B-A3B router top-8


def synthetic_batch(shape: tuple, vocab: int = 151936, seq_len: int = 512, seed: int = 0) -> dict:
    tokens, k, draws, p, layers, r, experts, _ = shape
    rng = np.random.default_rng(seed)
    lp = np.sort(rng.normal(-6, 3, (tokens, k)).astype(np.float32), axis=1)[:, ::-1] - 0.5
    n = rng.integers(1, 2 * draws, tokens)
    router = rng.dirichlet(np.ones(r), (tokens, layers)).astype(np.float32)
    return {"sample_ids": np.arange(tokens // seq_len), "seq_lens": np.full(tokens // seq_len, seq_len),
            "input_ids": rng.integers(0, vocab, tokens), "loss_mask": np.ones(tokens, np.uint8),
            "target_logprob": lp[:, 0], "log_partition": rng.normal(10, 1, (tokens, p)).astype(np.float32),
            "topk_ids": np.argsort(rng.random((tokens, vocab // 1024)), axis=1)[:, :k] * 1024 + rng.integers(0, 1024, (tokens, k)),
            "topk_logprobs": np.ascontiguousarray(lp), "draw_n": n, "draw_ids": rng.integers(0, vocab, int(n.sum())),
            "draw_counts": rng.integers(1, 8, int(n.sum())),
            "draw_logprobs": -rng.exponential(3.0, int(n.sum())).astype(np.float32),
            "router_ids": rng.integers(0, experts, (tokens, layers, r)), "router_probs": router}


def write(out: Path, shape: tuple, store: str) -> str:
    arrays = assemble_shard([sequences_from_flat(synthetic_batch(shape))], Codec(), num_experts=shape[6])
    name = shard_name(store, 0, 0)
    info = commit_shard(out, store, name, 0, arrays, shape[7], resolve_compression(store, "auto"), 3)
    write_manifest(out, Manifest(identity={"codec": Codec().to_dict()}, store=store,
                                 fields=sorted(arrays), shards=[info], complete=True))
    return name


def chunk_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != "zarr.json") if path.is_dir() else []


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(shape_name: str, store: str, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        name = write(out, SHAPES[shape_name], store)
        path, stored = out / name, sum(p.stat().st_size for p in [out / name, *(out / name).rglob("*")] if p.is_file())

        def decode() -> None:
            reader = CacheReader(out, verify=False)
            reader.read_shard(name)
            reader.close()

        chunks = chunk_files(path)
        results = {"decode every array": timed(decode, repeats), "sha256, whole shard": timed(lambda: checksum(path), repeats)}
        if chunks:
            results["sha256 per chunk"] = timed(lambda: [hashlib.sha256(c.read_bytes()).digest() for c in chunks], repeats)
            results["crc32 per chunk"] = timed(lambda: [zlib.crc32(c.read_bytes()) for c in chunks], repeats)
        base = results["decode every array"]
        print(f"{shape_name} shard, {store}: {SHAPES[shape_name][0]:,} tokens, {stored / 2**20:.1f} MiB stored, "
              f"{len(chunks) or 'one file'} chunk files")
        for what, seconds in results.items():
            print(f"  {what:22s} {seconds * 1e3:9.1f} ms  {seconds / base:6.1%} of decoding  "
                  f"{stored / seconds / 2**20:8.0f} MiB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--store", choices=["zarr", "hdf5", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for shape in SHAPES if args.shape == "all" else [args.shape]:
        for store in ("zarr", "hdf5") if args.store == "all" else [args.store]:
            bench(shape, store, args.repeats)


if __name__ == "__main__":
    main()
