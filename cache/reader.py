"""Read a finished cache: manifest checks, lazy shard handles, decoded sequence ranges.

Shard handles open on first use in the process that reads (h5py handles do not survive
fork), so a reader can be built in the parent and used inside DataLoader workers.

Every shard's bytes are checked against the manifest's sha256 before the first read from it
(``verify=True``, the default): a flipped byte in a compressed chunk can decode into plausible
numbers, and training on them says nothing. The names already checked survive ``close`` and
``fork``, so the workers of a reader built (and indexed) in the parent do not hash again.

Reads go through a cache of decoded chunks (LRU, bounded in bytes): a training sequence is
far shorter than a compressed chunk, and without it every sequence would decompress whole
chunks of every field again.

``read_many`` decodes any set of a shard's sequences at once (a micro-batch): one gather per
array over all their token rows, missing chunks fetched in contiguous runs (one store call per
run, not per chunk), and one top-k decode; no Python loop per sequence or position.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cache.codec import Codec, decode_draw_ids, decode_head, decode_router, dequantise
from cache.location import Location, objects_digest
from cache.schema import (CacheError, Manifest, Sequences, ShardInfo, TeacherRecord, pad_draws, ragged_arange,
                          read_manifest)
from cache.shards import open_shard, require_local
from cache.zarr_store import open_shard as open_fetched

PREFETCH_SHARDS = 2  # shards opened (object store: fetched whole and verified) ahead of the reads

WHOLE_SHARE = 1 / 16  # an array up to this share of the block cache is decoded (and kept) whole

TOKEN_FIELDS = ("input_ids", "loss_mask", "target_logprob", "log_partition", "topk_ids", "topk_logprobs", "draw_n",
                "router_ids", "router_probs")



class CacheReader:
    def __init__(self, cache_dir: Location | str | Path, block_cache_bytes: int = 256 << 20, verify: bool = True,
                 manifest: Manifest | None = None):
        """``manifest``: the shards to read when the cache is still growing (follow mode, cache/follow.py)."""
        self.location = Location.of(cache_dir)
        self.manifest: Manifest = manifest or read_manifest(self.location)
        if not self.manifest.complete and manifest is None:
            raise CacheError(f"{cache_dir} is not complete; finish the cache stage first")
        try:
            require_local(self.location, self.manifest.store)
        except ValueError as err:
            raise CacheError(str(err)) from None
        self.codec = Codec(**self.manifest.identity["codec"])
        self._handles: dict[str, object] = {}
        self._offsets: dict[str, np.ndarray] = {}
        self._sample_ids: dict[str, np.ndarray] = {}
        self._draw_offsets: dict[str, np.ndarray] = {}
        self._blocks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._block_bytes, self._max_block_bytes = 0, block_cache_bytes
        self._verify = verify
        self._verified: set[str] = set()
        self._infos = {s.name: s for s in self.manifest.shards}
        self._ahead: dict[str, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    def add_shards(self, infos: list[ShardInfo]) -> None:
        """Shards committed since (follow mode): readable from now on."""
        for info in infos:
            if info.name not in self._infos:
                self.manifest.shards.append(info)
                self._infos[info.name] = info

    @property
    def shards(self) -> list[ShardInfo]:
        return self.manifest.shards

    def shard(self, name: str):
        if name not in self._handles:
            future = self._ahead.pop(name, None)
            self._handles[name] = future.result() if future is not None else self._open(name)
        return self._handles[name]

    def _open(self, name: str):
        """A verified handle. On an object store the shard is fetched whole (concurrent GETs), checked, and
        read from memory: the bytes hashed are the bytes decoded, and no chunk is fetched twice."""
        if self.location.local:
            if self._verify and name not in self._verified:
                self.check_shard(name)
            return open_shard(self.location, self.manifest.store, name)
        objects = self.location.fetch(name)
        if self._verify and name not in self._verified:
            self._check(name, objects_digest(name, objects) if objects else None)
        return open_fetched(objects)

    def prefetch(self, names: list[str]) -> None:
        """Open the next shards (at most PREFETCH_SHARDS) in background threads: on an object store their
        download and hash overlap the reads of the current one. Local shards open on demand: the page
        cache has nothing to hide, and threads opening handles only compete with decoding (measured:
        scripts/bench_s3.py)."""
        if self.location.local:
            return
        if self._pool is None or self._pool_pid != os.getpid():  # threads do not survive fork
            self._pool, self._pool_pid, self._ahead = ThreadPoolExecutor(PREFETCH_SHARDS), os.getpid(), {}
        for name in names[:PREFETCH_SHARDS]:
            if name not in self._handles and name not in self._ahead:
                self._ahead[name] = self._pool.submit(self._open, name)

    def check_shard(self, name: str) -> None:
        """A CacheError (one line: the shard, what is wrong, what to do) unless its bytes match the manifest."""
        self._check(name, self.location.checksum(name) if self.location.exists(name) else None)

    def _check(self, name: str, digest: str | None) -> None:
        problem = "missing" if digest is None else None
        if problem is None and digest != self._infos[name].checksum:
            problem = "checksum mismatch: its bytes changed after the cache was written"
        if problem:
            raise CacheError(f"shard {self.location / name} is damaged ({problem}); list every damaged shard with "
                             f"`run_pipeline.py inspect {self.location} --verify`, then re-create the cache "
                             f"with `run_pipeline.py cache --force` (sets the old cache aside)")
        self._verified.add(name)

    def _index_handle(self, name: str):
        """What the index reads (offsets, sample ids) from: the verified handle, or on an object store a lazy one
        over the two small arrays (the whole shard is fetched and checked before any teacher value is read)."""
        if name in self._handles or self.location.local:
            return self.shard(name)
        try:
            return open_shard(self.location, self.manifest.store, name)  # two small arrays: not kept
        except Exception:  # missing or damaged metadata: the verified open names what is wrong
            return self.shard(name)

    def seq_offsets(self, name: str) -> np.ndarray:
        if name not in self._offsets:
            self._offsets[name] = np.asarray(self._index_handle(name)["seq_offsets"][:])
        return self._offsets[name]

    def seq_draw_offsets(self, name: str) -> np.ndarray:
        if name not in self._draw_offsets:
            self._draw_offsets[name] = np.asarray(self.shard(name)["seq_draw_offsets"][:])
        return self._draw_offsets[name]

    def sample_ids(self, name: str) -> np.ndarray:
        if name not in self._sample_ids:
            self._sample_ids[name] = np.asarray(self._index_handle(name)["sample_ids"][:])
        return self._sample_ids[name]

    def _chunks(self, name: str, key: str, chunks: np.ndarray, rows: int) -> list[np.ndarray]:
        """The decoded chunks ``chunks`` of one array, in order: cached ones from the block cache, the rest
        read with one store call per contiguous run and cached. Returned directly, so a gather whose
        chunks outgrow the block cache (a whole-vocabulary top-k) evicts them after use, not before."""
        found: dict[int, np.ndarray] = {}
        for c in chunks.tolist():
            if (name, key, c) in self._blocks:
                self._blocks.move_to_end((name, key, c))
                found[c] = self._blocks[(name, key, c)]
        missing = np.array([c for c in chunks.tolist() if c not in found], np.int64)
        for run in np.split(missing, np.flatnonzero(np.diff(missing) != 1) + 1) if len(missing) else []:
            data = np.asarray(self.shard(name)[key][int(run[0]) * rows:(int(run[-1]) + 1) * rows])
            for j, c in enumerate(run.tolist()):
                found[c] = data[j * rows:(j + 1) * rows].copy()
                self._put((name, key, c), found[c])
        return [found[c] for c in chunks.tolist()]

    def _put(self, cache_key: tuple, block: np.ndarray) -> None:
        self._blocks[cache_key] = block
        self._block_bytes += block.nbytes
        while self._block_bytes > self._max_block_bytes and len(self._blocks) > 1:
            self._block_bytes -= self._blocks.popitem(last=False)[1].nbytes

    def _whole(self, name: str, key: str, array) -> np.ndarray | None:
        """The whole decoded array when it takes at most WHOLE_SHARE of the block cache (one store read, and
        every later gather a single take), else None (the chunk path: large-k shards)."""
        cache_key = (name, key, "whole")
        if cache_key in self._blocks:
            self._blocks.move_to_end(cache_key)
            return self._blocks[cache_key]
        if int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize > self._max_block_bytes * WHOLE_SHARE:
            return None
        self._put(cache_key, np.asarray(array[:]))
        return self._blocks[cache_key]

    def gather(self, name: str, key: str, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Rows [starts[i], ends[i]) of one array, concatenated in order, from the cached decoded array (or
        its cached decoded chunks)."""
        array = self.shard(name)[key]
        rows = (array.chunks or (0,))[0]
        index = ragged_arange(starts, ends)
        if not len(index):
            return np.asarray(array[0:0])
        whole = self._whole(name, key, array)
        if whole is not None:
            return whole.take(index, axis=0)
        if not rows:  # an unchunked array: one read over the span the rows lie in
            lo = int(index[0] if len(starts) == 1 else index.min())
            return np.asarray(array[lo:int(np.max(ends))])[index - lo]
        keep = np.asarray(ends) > np.asarray(starts)
        chunks = np.unique(ragged_arange(np.asarray(starts)[keep] // rows, (np.asarray(ends)[keep] - 1) // rows + 1))
        parts = self._chunks(name, key, chunks, rows)  # per chunk touched (a few), not per sequence or position
        first = int(chunks[0])
        if len(chunks) == chunks[-1] - first + 1:  # contiguous chunks: an offset
            position = index - first * rows
        else:  # only the array's last chunk may be short, and it sorts last: chunk j starts at j * rows
            slot = np.zeros(int(chunks[-1]) - first + 1, np.int64)
            slot[chunks - first] = np.arange(len(chunks))
            position = slot[index // rows - first] * rows + index % rows
        buffer = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return buffer[position]

    def read_many(self, name: str, seqs: np.ndarray) -> Sequences:
        """Sequences ``seqs`` of a shard (local indices, in that order), decoded in one go: one gather per
        stored array over all their rows, then one vectorised decode per field (cache/codec.py)."""
        shard, offsets, codec = self.shard(name), self.seq_offsets(name), self.codec
        seqs = np.asarray(seqs, np.int64)
        a, b = offsets[seqs], offsets[seqs + 1]
        get = {k: self.gather(name, k, a, b) for k in TOKEN_FIELDS if k in shard}
        unit = np.zeros((int((b - a).sum()), 1), np.float32)  # the gauge log Z_1 = 0 (column 0 is not stored)
        t = {"target_logprob": dequantise(get["target_logprob"], 32 if codec.logprob_bits == 32 else 16),
             "log_partition": np.concatenate([unit, get["log_partition"]], 1) if "log_partition" in get else unit}
        if "topk_ids" in get:
            t["topk_ids"], t["topk_logprobs"] = decode_head(get["topk_ids"], get["topk_logprobs"], codec)
        if "draw_n" in get:
            draw_n = get["draw_n"].astype(np.int64)
            bounds = self.seq_draw_offsets(name)
            d_a, d_b = bounds[seqs], bounds[seqs + 1]
            ragged = [decode_draw_ids(draw_n, self.gather(name, "draw_ids", d_a, d_b), codec),
                      self.gather(name, "draw_counts", d_a, d_b).astype(np.int32),
                      dequantise(self.gather(name, "draw_logprobs", d_a, d_b), codec.logprob_bits)]
            t["draw_ids"], t["draw_counts"], t["draw_logprobs"] = pad_draws(draw_n, ragged)
        if "router_ids" in get:
            t["router_ids"], t["router_probs"] = decode_router(get["router_ids"], get.get("router_probs"), codec)
        teacher = TeacherRecord(temperatures=self.temperatures, draw_temperature=self.draw_temperature, **t)
        return Sequences(sample_ids=self.sample_ids(name)[seqs], seq_lens=b - a, input_ids=get["input_ids"],
                         loss_mask=get["loss_mask"], teacher=teacher)

    def read(self, name: str, first_seq: int, last_seq: int) -> Sequences:
        """Sequences [first_seq, last_seq) of a shard, decoded."""
        return self.read_many(name, np.arange(first_seq, last_seq))

    @property
    def draw_temperature(self) -> float:
        return float((self.manifest.identity.get("draws") or {}).get("temperature", 1.0))

    @property
    def temperatures(self) -> tuple[float, ...]:
        return tuple(float(t) for t in self.manifest.identity.get("temperatures", [1.0]))

    def read_shard(self, name: str) -> Sequences:
        return self.read(name, 0, len(self.seq_offsets(name)) - 1)

    def verify(self) -> list[str]:
        """Names of the shards whose bytes no longer match their recorded checksum."""
        bad = []
        for info in self.shards:
            if not self.location.exists(info.name) or self.location.checksum(info.name) != info.checksum:
                bad.append(info.name)
            else:
                self._verified.add(info.name)
        return bad

    def close(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._blocks.clear()
        self._block_bytes = 0
