"""HDF5 shard store: one shard is one HDF5 file, chunked datasets with h5py's filters.

HDF5 handles do not survive ``fork``: readers open shards lazily, inside each worker.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from cache.schema import chunk_rows

SUFFIX = ".h5"
COMPRESSIONS = ("gzip", "lzf", "none")


def _filters(compression: str, level: int) -> dict:
    if compression == "none":
        return {}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    return {"compression": "gzip", "compression_opts": level, "shuffle": True}


def write_shard(path: Path, arrays: dict[str, np.ndarray], chunk_tokens: int, compression: str, level: int) -> None:
    """Build the file in memory (HDF5's core driver), then write its image with plain file I/O: a full
    disk is then an OSError (ENOSPC) the writer turns into one line, never a crash inside libhdf5."""
    rows = chunk_rows(arrays, chunk_tokens)
    with h5py.File(Path(path).name, "w", driver="core", backing_store=False) as f:
        for name, data in arrays.items():
            if len(data) == 0:
                f.create_dataset(name, data=data)
                continue
            chunks = (rows[name],) + data.shape[1:]
            f.create_dataset(name, data=data, chunks=chunks, **_filters(compression, level))
        f.flush()
        image = f.id.get_file_image()
    with open(path, "wb") as out:
        out.write(image)
        out.flush()
        os.fsync(out.fileno())


class H5Shard:
    """Read side: ``shard[name][a:b]`` decodes only the chunks it touches."""

    def __init__(self, path: Path):
        self._file = h5py.File(path, "r")

    def __getitem__(self, name: str):
        return self._file[name]

    def keys(self) -> list[str]:
        return sorted(self._file.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def stored_nbytes(self, name: str) -> int:
        return int(self._file[name].id.get_storage_size())

    def close(self) -> None:
        self._file.close()


def open_shard(path: Path) -> H5Shard:
    return H5Shard(path)
