"""HDF5 shard store: one shard is one HDF5 file, chunked datasets with h5py's filters.

HDF5 handles do not survive ``fork``: readers open shards lazily, inside each worker.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

SUFFIX = ".h5"
COMPRESSIONS = ("gzip", "lzf", "none")


def _filters(compression: str, level: int) -> dict:
    if compression == "none":
        return {}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    return {"compression": "gzip", "compression_opts": level, "shuffle": True}


def write_shard(path: Path, arrays: dict[str, np.ndarray], chunk_rows: int, compression: str, level: int) -> None:
    with h5py.File(path, "w") as f:
        for name, data in arrays.items():
            if len(data) == 0:
                f.create_dataset(name, data=data)
                continue
            chunks = (max(1, min(chunk_rows, len(data))),) + data.shape[1:]
            f.create_dataset(name, data=data, chunks=chunks, **_filters(compression, level))


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
