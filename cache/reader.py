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
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from cache.codec import Codec, decode_topk
from cache.schema import CacheError, Manifest, ShardInfo, TeacherOutput, read_manifest
from cache.shards import checksum, open_shard

TOKEN_FIELDS = ("input_ids", "loss_mask", "target_logprob", "log_partition", "topk_ids", "topk_logprobs",
                "router_ids", "router_probs")


class CacheReader:
    def __init__(self, cache_dir: str | Path, block_cache_bytes: int = 256 << 20, verify: bool = True):
        self.cache_dir = Path(cache_dir)
        self.manifest: Manifest = read_manifest(self.cache_dir)
        if not self.manifest.complete:
            raise CacheError(f"{cache_dir} is not complete; finish the cache stage first")
        self.codec = Codec(**self.manifest.identity["codec"])
        self._handles: dict[str, object] = {}
        self._offsets: dict[str, np.ndarray] = {}
        self._sample_ids: dict[str, np.ndarray] = {}
        self._blocks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._block_bytes, self._max_block_bytes = 0, block_cache_bytes
        self._verify = verify
        self._verified: set[str] = set()
        self._infos = {s.name: s for s in self.manifest.shards}

    @property
    def shards(self) -> list[ShardInfo]:
        return self.manifest.shards

    def shard(self, name: str):
        if name not in self._handles:
            if self._verify and name not in self._verified:
                self.check_shard(name)
            self._handles[name] = open_shard(self.cache_dir, self.manifest.store, name)
        return self._handles[name]

    def check_shard(self, name: str) -> None:
        """A CacheError (one line: the shard, what is wrong, what to do) unless its bytes match the manifest."""
        path = self.cache_dir / name
        problem = "missing" if not path.exists() else None
        if problem is None and checksum(path) != self._infos[name].checksum:
            problem = "checksum mismatch: its bytes changed after the cache was written"
        if problem:
            raise CacheError(f"shard {path} is damaged ({problem}); list every damaged shard with "
                             f"`run_pipeline.py inspect {self.cache_dir} --verify`, then re-create the cache "
                             f"with `run_pipeline.py cache --force` (sets the old cache aside)")
        self._verified.add(name)

    def seq_offsets(self, name: str) -> np.ndarray:
        if name not in self._offsets:
            self._offsets[name] = np.asarray(self.shard(name)["seq_offsets"][:])
        return self._offsets[name]

    def sample_ids(self, name: str) -> np.ndarray:
        if name not in self._sample_ids:
            self._sample_ids[name] = np.asarray(self.shard(name)["sample_ids"][:])
        return self._sample_ids[name]

    def _block(self, name: str, key: str, index: int, rows: int) -> np.ndarray:
        cache_key = (name, key, index)
        block = self._blocks.get(cache_key)
        if block is None:
            block = np.asarray(self.shard(name)[key][index * rows:(index + 1) * rows])
            self._blocks[cache_key] = block
            self._block_bytes += block.nbytes
            while self._block_bytes > self._max_block_bytes and len(self._blocks) > 1:
                self._block_bytes -= self._blocks.popitem(last=False)[1].nbytes
        else:
            self._blocks.move_to_end(cache_key)
        return block

    def rows(self, name: str, key: str, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of one array, assembled from cached decoded chunks."""
        array = self.shard(name)[key]
        rows = (array.chunks or (0,))[0]
        if not rows or b <= a:
            return np.asarray(array[a:b])
        parts = [self._block(name, key, i, rows) for i in range(a // rows, (b - 1) // rows + 1)]
        start = a - (a // rows) * rows
        return np.concatenate(parts)[start:start + (b - a)] if len(parts) > 1 else parts[0][start:start + (b - a)]

    def read(self, name: str, first_seq: int, last_seq: int) -> TeacherOutput:
        """Sequences [first_seq, last_seq) of a shard, decoded."""
        shard, offsets = self.shard(name), self.seq_offsets(name)
        a, b = int(offsets[first_seq]), int(offsets[last_seq])
        fields = {k: self.rows(name, k, a, b) for k in TOKEN_FIELDS if k in shard}
        if "topk_ids" in fields:
            fields["topk_ids"], fields["topk_logprobs"] = decode_topk(fields["topk_ids"], fields["topk_logprobs"], self.codec)
        if "draw_offsets" in shard:
            bounds = self.rows(name, "draw_offsets", a, b + 1)
            fields["draw_n"] = np.diff(bounds)
            fields["draw_ids"] = self.rows(name, "draw_ids", int(bounds[0]), int(bounds[-1]))
            fields["draw_counts"] = self.rows(name, "draw_counts", int(bounds[0]), int(bounds[-1]))
        return TeacherOutput(
            sample_ids=self.sample_ids(name)[first_seq:last_seq],
            seq_lens=np.diff(offsets[first_seq:last_seq + 1]), **fields,
        )

    def read_shard(self, name: str) -> TeacherOutput:
        return self.read(name, 0, len(self.seq_offsets(name)) - 1)

    def verify(self) -> list[str]:
        """Names of the shards whose bytes no longer match their recorded checksum."""
        bad = []
        for info in self.shards:
            path = self.cache_dir / info.name
            if not path.exists() or checksum(path) != info.checksum:
                bad.append(info.name)
            else:
                self._verified.add(info.name)
        return bad

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._blocks.clear()
        self._block_bytes = 0
