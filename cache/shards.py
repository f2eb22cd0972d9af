"""What both stores share: the store map, shard naming, checksums and whole-shard commits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache import h5_store, zarr_store
from cache.location import Location
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
    """sha256 over every file of a local shard (its keys relative to the cache, then its bytes; cache/location.py)."""
    path = Path(path)
    return Location(path.parent).checksum(path.name)


def commit_shard(cache_dir: Location | Path, store: str, name: str, rank: int, arrays: dict[str, np.ndarray],
                 chunk_tokens: int, compression: str, level: int) -> ShardInfo:
    """Write a shard whole (renamed into place locally, uploaded object by object on an object store):
    it becomes data only once the journal that names it is written (cache/writer.py)."""
    module = get_store(store)
    write = lambda target: module.write_shard(target, arrays, chunk_tokens, compression, level)  # noqa: E731
    nbytes, digest = Location.of(cache_dir).put_shard(name, write)
    return ShardInfo(name=name, rank=rank, n_tokens=len(arrays["input_ids"]), n_seqs=len(arrays["sample_ids"]),
                     nbytes=nbytes, checksum=digest)


def open_shard(cache_dir: Location | Path, store: str, name: str):
    """A lazy read handle on a committed shard (HDF5: a local file; Zarr: a path or fsspec's store)."""
    location = Location.of(cache_dir)
    if store == "hdf5":
        return get_store(store).open_shard(location.path(name))
    return get_store(store).open_shard(location.zarr_store(name))


def require_local(location: Location, store: str) -> None:
    """HDF5 writes and reads files through libhdf5: an object store is refused with one line."""
    if store == "hdf5" and not location.local:
        raise ValueError(f"cache.store=hdf5 needs a local cache directory, not {location}; use cache.store=zarr "
                         f"for object storage (or a local cache.dir)")
