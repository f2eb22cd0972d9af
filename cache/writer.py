"""One rank's cache writer, and the manifest merge that ends a cache.

The writer takes batches of whole sequences (``Sequences`` with their teacher record) and closes
a shard before the sequence that would take it over ``shard_tokens`` tokens or ``shard_bytes``
raw bytes (a batch may be split between two shards; a shard holds at least one sequence), so
the memory a rank holds is bounded by bytes at any k. The boundaries depend only on the stream
of sequences (their lengths and records), never on how they were batched or where a killed
run stopped: a resumed run, which drops the sequences the journals list (``skip``), cuts the
same shards. After every commit the rank's journal is rewritten atomically. The last act of a
cache is ``finalize``: it merges every journal into ``manifest.json``.

A full disk is one ``CacheError`` naming the directory and the space a shard needs: checked
before each shard is written (h5py can crash outright when a write hits ENOSPC), and caught
if a write still hits it; the partial shard is removed and the committed ones are kept, so
the same command resumes once space is freed.
"""

from __future__ import annotations

import errno
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cache.codec import Codec, encode_draws, encode_head, encode_router, quantise
from cache.location import Location
from cache.schema import (CacheError, Manifest, Sequences, ShardInfo, concat_sequences, identity_mismatch,
                          take_sequences, write_manifest)
from cache.shards import commit_shard, open_shard, shard_name

SPACE_MARGIN = 1.25  # expected encoded size × this + 1 MiB must be free before a shard is written

JOURNAL_DIR = "journal"


def journal_name(rank: int) -> str:
    return f"{JOURNAL_DIR}/rank{rank:03d}.json"


def read_journals(cache_dir: Location | Path) -> list[dict]:
    """Every rank's journal (one listing: on an object store, one LIST request)."""
    location = Location.of(cache_dir)
    return [json.loads(location.read_bytes(name)) for name in location.names(f"{JOURNAL_DIR}/rank*.json")]


def check_identity(cache_dir: Location | Path, identity: dict) -> None:
    """Refuse to add to a cache made from another teacher, tokenizer, dataset or k."""
    for journal in read_journals(cache_dir):
        diff = identity_mismatch(identity, journal["identity"])
        if diff:
            raise CacheError(
                f"{cache_dir} holds a cache made with other settings ({', '.join(diff)} differ); "
                f"use another run name or output directory, or pass --force to set it aside"
            )


def committed_shards(cache_dir: Location | Path) -> list[ShardInfo]:
    return [ShardInfo(**s) for j in read_journals(cache_dir) for s in j["shards"]]


def committed_sample_ids(cache_dir: Location | Path, store: str) -> set[int]:
    done: set[int] = set()
    for info in committed_shards(cache_dir):
        shard = open_shard(cache_dir, store, info.name)
        done.update(int(i) for i in shard["sample_ids"][:])
        shard.close()
    return done


def sequence_bytes(batch: Sequences) -> np.ndarray:
    """[S] raw bytes each sequence of a batch holds in memory: its own entries and its token rows."""
    lens = np.asarray(batch.seq_lens, dtype=np.int64)
    per_token = [batch.input_ids, batch.loss_mask, *(batch.teacher.arrays().values() if batch.teacher else ())]
    row = sum(a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64)) for a in per_token)
    return row * lens + batch.sample_ids.itemsize + batch.seq_lens.itemsize


def assemble_shard(batches: list[Sequences], codec: Codec, num_experts: int) -> dict[str, np.ndarray]:
    """The stored (v2-encoded, cache/codec.py) arrays of one shard from its batches: the draws stored ragged
    (the ids drawn at least once, ``draw_n`` per token, ``seq_draw_offsets`` per sequence)."""
    cat = concat_sequences(batches)
    batches.clear()  # the batch records go as the shard is assembled: about one copy held, not two
    t = cat.teacher
    out = {
        "sample_ids": cat.sample_ids.astype(np.int64, copy=False),
        "seq_offsets": np.concatenate([[0], np.cumsum(cat.seq_lens)]).astype(np.int64),
        "input_ids": cat.input_ids.astype(np.int32, copy=False),
        "loss_mask": cat.loss_mask.astype(np.uint8, copy=False),
        "target_logprob": quantise(t.target_logprob, 32 if codec.logprob_bits == 32 else 16),
    }
    if t.log_partition.shape[1] > 1:  # backends hand over the gauge log Z_1 = 0: column 0 is not stored
        out["log_partition"] = t.log_partition[:, 1:].astype(np.float32)
    if t.topk_ids is not None:
        out["topk_ids"], out["topk_logprobs"] = encode_head(t.topk_ids, t.topk_logprobs, codec)
    if t.draw_ids is not None:
        drawn_TD = t.draw_counts > 0
        draw_n = drawn_TD.sum(1)
        out.update(encode_draws(draw_n, t.draw_ids[drawn_TD], t.draw_counts[drawn_TD], t.draw_logprobs[drawn_TD], codec))
        out["seq_draw_offsets"] = np.concatenate([[0], np.cumsum(draw_n, dtype=np.int64)])[out["seq_offsets"]]
    if t.router_ids is not None:
        out["router_ids"], probs = encode_router(t.router_ids, t.router_probs, codec, num_experts)
        if probs is not None:  # absent in an ids-only router cache (vLLM teacher)
            out["router_probs"] = probs
    return out


class CacheWriter:
    """Context manager for one rank: ``add`` batches, shards commit in a background thread.

    It holds at most one shard filling (``shard_bytes`` raw bytes; ``peak_buffered_bytes`` records
    the most it held) and one shard being written, with its encoded arrays.
    """

    def __init__(self, cache_dir: Location | Path, *, rank: int, identity: dict, store: str, codec: Codec,
                 shard_tokens: int, chunk_tokens: int, compression: str, level: int, num_experts: int = 0,
                 shard_bytes: int = 1 << 30, skip: set[int] = frozenset(), world_size: int = 1):
        self.location, self.rank, self.identity, self.store = Location.of(cache_dir), rank, identity, store
        self.cache_dir = self.location.url  # for messages
        self.codec, self.num_experts = codec, num_experts
        self._skip = np.array(sorted(skip), dtype=np.int64)
        self.shard_tokens, self.chunk_tokens, self.compression, self.level = shard_tokens, chunk_tokens, compression, level
        self.shard_bytes = shard_bytes
        self.world_size = world_size  # in the journal: a follower (cache/follow.py) knows which ranks to wait for
        self._buffer: list[Sequences] = []
        self._buffered_tokens = self._buffered_bytes = self.peak_buffered_bytes = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kdcache-writer{rank}")
        self._pending: Future | None = None
        journal = journal_name(rank)
        self._shards = ([ShardInfo(**s) for s in json.loads(self.location.read_bytes(journal))["shards"]]
                        if self.location.exists(journal) else [])

    def __enter__(self) -> "CacheWriter":
        self.location.makedirs()
        # a killed local run leaves half-written shards under a temporary name: never data, only bytes (on an
        # object store a partial shard sits under its final name, unlisted, and its commit overwrites it)
        for stale in self.location.names(f".r{self.rank:03d}-*.tmp*"):
            self.location.remove(stale)
        return self

    def add(self, batch: Sequences) -> None:
        """Buffer a batch's sequences (less those in ``skip``: committed before a resume), committing a
        shard before the first sequence that would take it over ``shard_tokens`` or ``shard_bytes``."""
        done = np.isin(batch.sample_ids, self._skip)
        if done.any():
            batch = take_sequences(batch, np.flatnonzero(~done))
        lens, sizes = np.asarray(batch.seq_lens, dtype=np.int64), sequence_bytes(batch)
        start = 0
        while start < len(lens):
            fit = int(np.sum((np.cumsum(lens[start:]) <= self.shard_tokens - self._buffered_tokens)
                             & (np.cumsum(sizes[start:]) <= self.shard_bytes - self._buffered_bytes)))
            if fit == 0 and self._buffer:
                self.flush()
                continue
            fit = max(fit, 1)  # a sequence larger than a whole shard is a shard of its own
            whole = start == 0 and fit == len(lens)
            self._buffer.append(batch if whole else take_sequences(batch, np.arange(start, start + fit)))
            self._buffered_tokens += int(lens[start:start + fit].sum())
            self._buffered_bytes += int(sizes[start:start + fit].sum())
            self.peak_buffered_bytes = max(self.peak_buffered_bytes, self._buffered_bytes)
            start += fit

    def flush(self) -> None:
        if not self._buffer:
            return
        self._wait()  # at most one shard in flight bounds the memory held
        batches, self._buffer, self._buffered_tokens, self._buffered_bytes = self._buffer, [], 0, 0
        self._pending = self._pool.submit(self._commit, batches)

    def _commit(self, batches: list[Sequences]) -> None:
        arrays = assemble_shard(batches, self.codec, self.num_experts)
        name = shard_name(self.store, self.rank, len(self._shards))
        needed = self._expected_bytes(arrays)
        free = self.location.free_bytes()
        if free is not None and free < needed:
            raise disk_full(self.cache_dir, name, needed, free)
        try:
            info = commit_shard(self.location, self.store, name, self.rank, arrays,
                                self.chunk_tokens, self.compression, self.level)
            journal = {"identity": self.identity, "world_size": self.world_size,
                       "shards": [asdict(s) for s in self._shards + [info]]}
            # the commit point: the shard is data from this object on (written whole: rename, or one PUT)
            self.location.write_whole(journal_name(self.rank), json.dumps(journal, indent=1).encode())
        except Exception as err:  # zarr's async store may wrap the OSError
            if not is_disk_full(err):
                raise
            self._remove_uncommitted(name)
            raise disk_full(self.cache_dir, name, needed, self.location.free_bytes(), writing=True) from None
        self._shards.append(info)

    def _expected_bytes(self, arrays: dict[str, np.ndarray]) -> int:
        """Encoded size of a shard: tokens × the largest bytes/token of the committed shards (raw size for
        the first), × SPACE_MARGIN + 1 MiB."""
        n_tokens = len(arrays["input_ids"])
        if self._shards:
            expected = n_tokens * max(s.nbytes / max(s.n_tokens, 1) for s in self._shards)
        else:
            expected = sum(a.nbytes for a in arrays.values())
        return int(expected * SPACE_MARGIN) + (1 << 20)

    def _remove_uncommitted(self, name: str) -> None:
        """A shard the journal does not list, its temporary form and a half-written journal: bytes, not data."""
        for stale in [name, *self.location.names(f".{name}.tmp*"),
                      *self.location.names(f"{JOURNAL_DIR}/.rank{self.rank:03d}.json.tmp*")]:
            self.location.remove(stale)

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.flush()
            self._wait()
        finally:
            self._pool.shutdown(wait=True)


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC (or EDQUOT), also when a library wrapped it (zarr's async store, h5py)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full(cache_dir, name: str, needed: int, free: int, writing: bool = False) -> CacheError:
    what = "the disk filled up while writing" if writing else "no space left for the cache in"
    return CacheError(f"{what} {cache_dir}: shard {name} needs about {needed / 2**20:,.1f} MiB, "
                      f"{free / 2**20:,.1f} MiB {'free now' if writing else 'free'}; free some space and re-run "
                      f"the same command (the committed shards are kept and the cache resumes)")


def finalize(cache_dir: Location | Path, identity: dict, store: str, fields: list[str]) -> Manifest:
    """Merge every rank's journal into the manifest, written last and atomically."""
    check_identity(cache_dir, identity)
    shards = sorted(committed_shards(cache_dir), key=lambda s: s.name)
    manifest = Manifest(identity=identity, store=store, fields=fields, shards=shards, complete=True)
    write_manifest(cache_dir, manifest)
    return manifest
