"""Where a cache's bytes live: a local directory or an fsspec URL (``s3://bucket/prefix``, ``gs://``, ...).

One object answers everything the format asks of storage: read and write whole small objects
(manifest, journals), list them, remove a shard, hash a shard's files, and put a shard whole.
What "whole" costs differs, and only here:

- **local**: a shard or a JSON file is written under a temporary name and renamed (``os.replace``),
  exactly as before this module existed;
- **object store** (no rename): a shard is encoded in memory and uploaded object by object under
  its final name, after removing whatever a killed run left there; every object is one PUT, so
  it is whole or absent. A shard becomes data only when the journal object naming it is written
  (one PUT too), and readers never look at a shard no journal or manifest lists.

A shard's checksum is sha256 over its files' keys (relative to the cache) and bytes, keys in
path-component order: the same number for the same bytes on disk or in a bucket, so a cache
copied between them still verifies.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


class StorageError(ValueError):
    """An object store that cannot be reached as configured (endpoint, credentials, bucket): one line."""


@contextlib.contextmanager
def reaching(location: "Location"):
    """Remote calls: an unreachable store is a StorageError naming it and the fix; a missing object stays
    FileNotFoundError (what the callers test for)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as err:
        if location.local:
            raise
        detail = (str(err).splitlines() or [""])[0]
        raise StorageError(f"cannot reach {location.url} ({type(err).__name__}: {detail}); check the credentials "
                           f"(AWS_* environment, ~/.aws), the endpoint (AWS_ENDPOINT_URL or cache.storage_options) "
                           f"and that the bucket exists") from None


class Location:
    """A cache directory. ``Location("runs/x/cache")`` or ``Location("s3://bucket/x/cache", {...})``:
    ``storage_options`` go to fsspec (endpoint, profile, ...); credentials come from the usual AWS
    environment and config files."""

    def __init__(self, url: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        self.url = str(url).rstrip("/") or "/"
        self.storage_options = dict(storage_options or {})
        protocol = fsspec.core.split_protocol(self.url)[0]
        self.local = protocol in (None, "file", "local")
        self.root = str(Path(fsspec.core.strip_protocol(self.url)) if self.local else self.url.split("://", 1)[1])
        self._fs, self._pid = None, None

    @classmethod
    def of(cls, where: "Location | str | os.PathLike") -> "Location":
        return where if isinstance(where, Location) else cls(where)

    def __truediv__(self, name: str) -> "Location":
        child = Location(f"{self.url}/{name}", self.storage_options)
        child._fs, child._pid = self._fs, self._pid
        return child

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem, made again in a forked process (an async client's session is the parent's)."""
        if self._fs is None or self._pid != os.getpid():
            self._fs = LocalFileSystem() if self.local else fsspec.core.url_to_fs(self.url, **self.storage_options)[0]
            self._pid = os.getpid()
        return self._fs

    def key(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    def path(self, name: str = "") -> Path:
        """The local path (HDF5 and the local commit need one)."""
        assert self.local, f"{self.url} is not a local path"
        return Path(self.root) / name if name else Path(self.root)

    # --- small whole objects -----------------------------------------------------------------

    def exists(self, name: str = "") -> bool:
        if self.local:
            return self.path(name).exists()
        with reaching(self):
            self.fs.invalidate_cache()  # another process may have written it since this one last listed
            return self.fs.exists(self.key(name))

    def read_bytes(self, name: str) -> bytes:
        if self.local:
            return self.path(name).read_bytes()
        with reaching(self):
            return self.fs.cat_file(self.key(name))

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def write_whole(self, name: str, data: bytes) -> None:
        """Readers see the old object or the whole new one: temp file + fsync + rename, or one PUT."""
        if not self.local:
            with reaching(self):
                self.fs.pipe_file(self.key(name), data)
            return
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_bytes(data)

    def names(self, pattern: str) -> list[str]:
        """Names (relative to this location) matching a glob such as ``journal/rank*.json``, sorted."""
        if self.local:
            return sorted(str(p.relative_to(self.path())) for p in self.path().glob(pattern))
        prefix = len(self.root) + 1
        with reaching(self):
            self.fs.invalidate_cache()  # listings are cached per process; another one may have committed since
            return sorted(k[prefix:] for k in self.fs.glob(self.key(pattern)))

    def makedirs(self) -> None:
        if self.local:  # an object store has no folders; its bucket must exist
            self.path().mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int | None:
        """Free space where the shards go; None for an object store (no disk to fill)."""
        return shutil.disk_usage(self.path()).free if self.local else None

    def remove(self, name: str) -> None:
        """A file, a directory or every object under a prefix; nothing if absent."""
        if self.local:
            path = self.path(name)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            return
        try:
            self.fs.rm(self.key(name), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    # --- shards ------------------------------------------------------------------------------

    def files(self, name: str) -> list[str]:
        """Keys (relative to this location) of a shard's files (one file or a tree), in checksum order."""
        if self.local:
            path = self.path(name)
            found = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            keys = [str(p.relative_to(self.path())) for p in found]
        else:
            prefix = len(self.root) + 1
            keys = [k[prefix:] for k in self.fs.find(self.key(name))]
        return sorted(keys, key=lambda k: k.split("/"))

    def fetch(self, name: str) -> dict[str, bytes]:
        """Every file of a shard, whole, keys relative to the shard (concurrent GETs on an object store)."""
        keys = self.files(name)
        if not keys:  # a missing shard: nothing to fetch
            return {}
        if self.local:
            return {k[len(name) + 1:] or k: self.path(k).read_bytes() for k in keys}
        data = self.fs.cat([self.key(k) for k in keys])
        return {k[len(name) + 1:]: data[self.key(k)] for k in keys}

    def checksum(self, name: str) -> str:
        if self.local:  # block by block: a shard never has to fit in memory to be checked
            return tree_digest((k, _blocks(self.path(k))) for k in self.files(name))
        return objects_digest(name, self.fetch(name))

    def nbytes(self, name: str) -> int:
        if self.local:
            return sum(self.path(k).stat().st_size for k in self.files(name))
        return sum(self.fs.sizes([self.key(k) for k in self.files(name)]))

    def put_shard(self, name: str, write: Callable[[Any], None]) -> tuple[int, str]:
        """Write a shard whole; (bytes, checksum). ``write(target)`` fills a local temporary path, or an
        in-memory zarr store whose objects are then uploaded under the final name."""
        if self.local:
            final = self.path(name)
            tmp = final.with_name(f".{name}.tmp{os.getpid()}")
            self.remove(tmp.name)
            write(tmp)
            self.remove(name)  # an orphan of a crash between rename and journal: not listed, so not data
            os.replace(tmp, final)
            return self.nbytes(name), self.checksum(name)
        from zarr.storage import MemoryStore

        memory: dict = {}
        write(MemoryStore(memory))
        objects = {key: buffer.to_bytes() for key, buffer in memory.items()}
        self.remove(name)  # a killed run's partial upload: never journaled, so never data
        self.fs.pipe({self.key(f"{name}/{key}"): data for key, data in objects.items()})
        return sum(len(v) for v in objects.values()), objects_digest(name, objects)

    def zarr_store(self, name: str):
        """A zarr store over a shard, read lazily (a local path; fsspec's store for a URL)."""
        if self.local:
            return str(self.path(name))
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(f"{self.url}/{name}", storage_options=self.storage_options, read_only=True)


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside ``path`` to write a file at; on leaving, the file is synced to
    disk and renamed onto ``path``, so readers see the old file or the whole new one; after an
    error it is removed. The one write-then-rename for files (a local shard or checkpoint
    directory commits by its own rename: Location.put_shard, pipeline/checkpoint.py)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # per process: ranks writing at once never share one
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _blocks(path: Path) -> Iterable[bytes]:
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(1 << 20), b"")


def tree_digest(files: Iterable[tuple[str, Iterable[bytes]]]) -> str:
    """sha256 over (key, bytes) pairs in the order given."""
    digest = hashlib.sha256()
    for key, blocks in files:
        digest.update(key.encode())
        for block in blocks:
            digest.update(block)
    return digest.hexdigest()


def objects_digest(name: str, objects: dict[str, bytes]) -> str:
    """The checksum of a shard held in memory (keys relative to the shard)."""
    keys = sorted(objects, key=lambda k: k.split("/"))
    return tree_digest((f"{name}/{k}", [objects[k]]) for k in keys)
