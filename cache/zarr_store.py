"""Zarr v3 shard store: one shard is one Zarr group (a directory or a key prefix), numcodecs compressors.

A shard is written to and read from anything zarr takes as a store: a local path, an in-memory
store (the objects an object-store commit uploads, or a fetched shard) or fsspec's store.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import zarr
from zarr.core.buffer.cpu import Buffer
from zarr.storage import MemoryStore

from cache.schema import chunk_rows

try:  # zarr 3.1 ships numcodecs' codecs here; later releases moved them to numcodecs.zarr3
    from zarr.codecs.numcodecs import GZip, Shuffle, Zstd
except ImportError:  # pragma: no cover - depends on the installed zarr
    from numcodecs.zarr3 import GZip, Shuffle, Zstd

# numcodecs codecs are valid Zarr v3 extensions that zarr-python reads; we only ever read our own shards
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

SUFFIX = ".zarr"
COMPRESSIONS = ("zstd", "gzip", "none")


def _compressors(compression: str, level: int, itemsize: int) -> list:
    if compression == "none":
        return []
    codec = Zstd(level=level) if compression == "zstd" else GZip(level=level)
    return [Shuffle(elementsize=itemsize), codec] if itemsize > 1 else [codec]


def write_shard(target, arrays: dict[str, np.ndarray], chunk_tokens: int, compression: str, level: int) -> None:
    """``target``: a path or a zarr store."""
    group = zarr.open_group(_store(target), mode="w", zarr_format=3)
    rows = chunk_rows(arrays, chunk_tokens)
    for name, data in arrays.items():
        chunks = (rows[name],) + data.shape[1:]
        group.create_array(  # write_empty_chunks: skip zarr's compare of every chunk with the fill value
            name, data=data, chunks=chunks, compressors=_compressors(compression, level, data.dtype.itemsize),
            config={"write_empty_chunks": True},
        )


class ZarrShard:
    """Read side: ``shard[name][a:b]`` decodes only the chunks it touches."""

    def __init__(self, source):
        self._group = zarr.open_group(_store(source), mode="r", zarr_format=3)
        self._arrays: dict[str, zarr.Array] = {}
        self._keys: list[str] | None = None  # listed on first use: a listing is a store round trip

    def __getitem__(self, name: str):
        if name not in self._arrays:  # each lookup is a metadata read through zarr's event loop
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = sorted(self._group.array_keys())
        return self._keys

    def __contains__(self, name: str) -> bool:
        return name in self._arrays or name in self.keys()

    def stored_nbytes(self, name: str) -> int:
        return int(self._group[name].nbytes_stored())

    def close(self) -> None:
        pass


def open_shard(source) -> ZarrShard:
    """``source``: a path, a zarr store, or a fetched shard's {key: bytes}."""
    return ZarrShard(source)


def _store(target):
    if isinstance(target, Path):
        return str(target)
    if isinstance(target, dict):  # a shard fetched whole: its objects, served from memory
        return MemoryStore({key: Buffer.from_bytes(data) for key, data in target.items()}, read_only=True)
    return target
