"""What both stores share: the store map, shard naming, checksums and atomic commits."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from cache import h5_store, zarr_store
from cache.schema import ShardInfo

STORES = {"zarr": zarr_store, "hdf5": h5_store}
DEFAULT_COMPRESSION = {"zarr": "zstd", "hdf5": "gzip"}


def get_store(name: str):
    if name not in STORES:
        raise ValueError(f"cache.store={name!r} is unknown; allowed: {', '.join(STORES)}")
    return STORES[name]


def resolve_compression(store: str, compression: str) -> str:
    """'auto' → the store's default; otherwise check the store offers it."""
    if compression == "auto":
        return DEFAULT_COMPRESSION[store]
    allowed = get_store(store).COMPRESSIONS
    if compression not in allowed:
        raise ValueError(
            f"cache.compression={compression!r} is not available for cache.store={store}; "
            f"allowed: auto, {', '.join(allowed)}"
        )
    return compression


def shard_name(store: str, rank: int, index: int) -> str:
    return f"r{rank:03d}-{index:05d}{get_store(store).SUFFIX}"


def checksum(path: Path) -> str:
    """sha256 over every file of a shard (a file, or a directory walked in sorted order)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def commit_shard(cache_dir: Path, store: str, name: str, rank: int, arrays: dict[str, np.ndarray],
                 chunk_rows: int, compression: str, level: int) -> ShardInfo:
    """Write a shard under a temporary name, then rename it: a shard is whole or absent."""
    final = cache_dir / name
    tmp = cache_dir / f".{name}.tmp{os.getpid()}"
    remove(tmp)
    get_store(store).write_shard(tmp, arrays, chunk_rows, compression, level)
    remove(final)  # an orphan from a crash between rename and journal: not listed, so not data
    os.replace(tmp, final)
    n_seqs = len(arrays["sample_ids"])
    return ShardInfo(name=name, rank=rank, n_tokens=len(arrays["input_ids"]), n_seqs=n_seqs,
                     nbytes=disk_bytes(final), checksum=checksum(final))


def open_shard(cache_dir: Path, store: str, name: str):
    return get_store(store).open_shard(Path(cache_dir) / name)
