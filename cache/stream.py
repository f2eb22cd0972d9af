"""Plan and read the training batches of a cache (or of prepared data), resumably.

The plan is a pure function of (source, seed, epoch, batch settings):
1. shards are permuted by ``rng(seed, epoch)``; sequences follow in shard order and are
   shuffled within windows of ``shuffle_window`` sequences (locality for chunked reads);
2. the order is cut into global optimizer steps: ``batch_size`` sequences, or sequences
   until ``batch_tokens`` tokens (and at least ranks × micro-batches sequences);
3. step sequences are dealt to ranks (i % world_size == rank), and each rank's share is
   split into ``micro_batches`` gradient-accumulation micro-batches.
The position is the count of sequences of the epoch's order already consumed, so the
state ``{epoch, position}`` resumes exactly, whatever the rank count was. Numpy only: the
torch DataLoader wrapper (workers, tensors) lives in pipeline/batches.py.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cache.follow import Follower
from cache.reader import PREFETCH_SHARDS, CacheReader
from cache.schema import CacheError, Sequences, concat_sequences, take_sequences

INDEX_THREADS = 8


@dataclass(frozen=True)
class StreamPlan:
    seed: int = 0
    batch_size: int = 8  # sequences per optimizer step, all ranks together (when batch_tokens == 0)
    batch_tokens: int = 0  # tokens per optimizer step instead of a sequence count
    micro_batches: int = 1  # gradient-accumulation micro-batches per rank and step
    shuffle_window: int = 4096  # sequences shuffled together (0 = no shuffle)
    rank: int = 0
    world_size: int = 1
    drop_last: bool = True  # drop an epoch's final step that would be short
    follow: bool = False  # epoch 0 in commit order over a growing cache (cache/follow.py; docs/training.md)


@dataclass
class SequenceIndex:
    sample_ids: np.ndarray  # [N]
    lengths: np.ndarray  # [N]
    shard: np.ndarray  # [N] index into the source's shards
    local: np.ndarray  # [N] sequence index within its shard


class CacheSource:
    """Sequences of a finished cache (a path or a cache.location.Location), with the teacher's signal; with a
    ``follower``, of a cache still being written: its settled shards, in commit order, growing by ``grow``."""

    def __init__(self, cache_dir, follower: Follower | None = None):
        self.follower = follower
        if follower is None:
            self.reader = CacheReader(cache_dir)
        else:
            while not follower.shards and not follower.complete:
                follower.wait("first committed shard")
            self.reader = CacheReader(follower.location, manifest=follower.as_manifest())
        self.names = [s.name for s in self.reader.shards]

    @property
    def complete(self) -> bool:
        """No shard will be added (always, for a finished cache)."""
        return self.follower is None or self.follower.complete

    def grow(self, wait: bool) -> list[int]:
        """Follow mode: the shards settled since (indices into ``names``); ``wait``: poll until some do or the
        cache completes."""
        new = self.follower.wait() if wait else self.follower.refresh()
        self.reader.add_shards(new)
        self.names += [s.name for s in new]
        return list(range(len(self.names) - len(new), len(self.names)))

    def index(self) -> SequenceIndex:
        return self.index_of(range(len(self.names)))

    def index_of(self, shards) -> SequenceIndex:
        """The sequences of some shards (indices into ``names``), shard after shard: their small index arrays
        are read in INDEX_THREADS threads (on an object store each is a few round trips)."""
        def part(i: int):
            lengths = np.diff(self.reader.seq_offsets(self.names[i]))
            return self.reader.sample_ids(self.names[i]), lengths, np.full(len(lengths), i), np.arange(len(lengths))

        with ThreadPoolExecutor(INDEX_THREADS) as pool:
            parts = list(pool.map(part, shards))
        self.reader.close()  # handles must be opened again inside each worker
        if not parts:
            return SequenceIndex(*(np.zeros(0, np.int64) for _ in range(4)))
        return SequenceIndex(*(np.concatenate(col) for col in zip(*parts)))

    def prefetch(self, shards: list[int]) -> None:
        self.reader.prefetch([self.names[i] for i in shards])

    def read(self, shard: int, local: int) -> Sequences:
        return self.reader.read(self.names[shard], local, local + 1)

    def read_many(self, shard: int, locals_: np.ndarray) -> Sequences:
        return self.reader.read_many(self.names[shard], locals_)



class ShardStream:
    def __init__(self, source, plan: StreamPlan):
        self.source, self.plan = source, plan
        self.index = source.index()
        self.epoch, self.position = 0, 0
        self._shard_order: tuple = ((None, 0), None, None)  # (epoch, size) → the epoch's shards in order of use

    def __len__(self) -> int:
        return len(self.index.sample_ids)

    def growing(self, epoch: int) -> bool:
        """Follow mode's epoch 0 while the cache is still being written: only its settled prefix is planned."""
        return self.plan.follow and epoch == 0 and not self.source.complete

    def order(self, epoch: int) -> np.ndarray:
        """Sequence indices of an epoch, in the order they are consumed.

        Follow mode's epoch 0 takes the shards in commit order instead of a permutation; while the
        cache grows it ends at the last whole shuffle window (a window is shuffled once it is full),
        so the order only ever grows at its end."""
        rng = np.random.default_rng([self.plan.seed, epoch])
        shards = np.unique(self.index.shard)
        in_order = shards if self.plan.follow and epoch == 0 else rng.permutation(shards)
        by_shard = [np.flatnonzero(self.index.shard == s) for s in in_order]
        order = np.concatenate(by_shard) if by_shard else np.zeros(0, dtype=np.int64)
        window = self.plan.shuffle_window
        if window and self.growing(epoch):
            order = order[:len(order) // window * window]
        if window:
            for start in range(0, len(order), window):
                order[start:start + window] = rng.permutation(order[start:start + window])
        return order

    def steps(self, epoch: int, start: int = 0) -> list[np.ndarray]:
        """The epoch's global steps from ``start`` (a position) on."""
        order, plan, out = self.order(epoch)[start:], self.plan, []
        minimum = plan.world_size * plan.micro_batches
        cum = np.concatenate([[0], np.cumsum(self.index.lengths[order])])  # once: O(N), not O(N) per step
        i = 0
        while i < len(order):
            if plan.batch_tokens:
                # as many sequences as fit in the budget (side="right": a step may hit it exactly),
                # at least one per rank and micro-batch; a step that ends the epoch is short
                fit = int(np.searchsorted(cum, cum[i] + plan.batch_tokens, side="right")) - 1 - i
                n = max(fit, minimum, 1)
                rest = len(order) - i
                short = rest < n or (n == rest and cum[-1] - cum[i] < plan.batch_tokens)
            else:
                n = plan.batch_size
                short = len(order) - i < n
            if short and plan.drop_last:
                break
            out.append(order[i:i + n])
            i += n
        return out[:-1] if self.growing(epoch) else out  # the last step may still grow with the next shards

    def grow(self, wait: bool = False) -> int:
        """Follow mode: add the shards settled since to the index (at its end); how many were added."""
        new = self.source.grow(wait)
        if new:
            more = self.source.index_of(new)
            self.index = SequenceIndex(*(np.concatenate([a, b]) for a, b in zip(
                (self.index.sample_ids, self.index.lengths, self.index.shard, self.index.local),
                (more.sample_ids, more.lengths, more.shard, more.local))))
        return len(new)

    def rank_micro_batches(self, step: np.ndarray) -> list[np.ndarray]:
        mine = step[self.plan.rank::self.plan.world_size]
        return [part for part in np.array_split(mine, self.plan.micro_batches)]

    def load(self, seqs: np.ndarray, epoch: int | None = None) -> Sequences:
        """The sequences ``seqs`` decoded, in that order: one ``read_many`` per shard they touch, then
        one reorder. With ``epoch`` (the epoch whose plan they come from), the source reads the shards
        that come next ahead."""
        idx, seqs = self.index, np.asarray(seqs, np.int64)
        shards = idx.shard[seqs]
        if epoch is not None and len(shards):
            self.source.prefetch(self.shards_after(epoch, shards))
        by_shard = np.argsort(shards, kind="stable")
        groups = np.split(by_shard, np.flatnonzero(np.diff(shards[by_shard])) + 1)
        parts = [self.source.read_many(int(shards[g[0]]), idx.local[seqs[g]]) for g in groups]
        if len(parts) == 1:  # the stable sort left the order as it was
            return parts[0]
        return take_sequences(concat_sequences(parts), np.argsort(by_shard, kind="stable"))

    def shards_after(self, epoch: int, shards: np.ndarray) -> list[int]:
        """The PREFETCH_SHARDS shards the epoch's order reaches after the last of ``shards``."""
        if self._shard_order[0] != (epoch, len(self)):
            in_order = self.index.shard[self.order(epoch)]
            _, first = np.unique(in_order, return_index=True)
            sequence = in_order[np.sort(first)]
            rank = np.zeros(int(self.index.shard.max(initial=0)) + 1, np.int64)
            rank[sequence] = np.arange(len(sequence))
            self._shard_order = ((epoch, len(self)), sequence, rank)
        _, sequence, rank = self._shard_order
        last = int(rank[shards].max())
        return sequence[last + 1:last + 1 + PREFETCH_SHARDS].tolist()

    def advance(self, step: np.ndarray) -> None:
        """Record that ``step`` was consumed (call once the optimizer step is done)."""
        self.position += len(step)

    def next_epoch(self) -> None:
        self.epoch, self.position = self.epoch + 1, 0

    def fingerprint(self, n: int | None = None) -> str:
        """The sequences the stream holds (sample ids and lengths), whatever the shard order; ``n``: the first
        n of the index (follow mode: the index only grows at its end)."""
        ids, lengths = self.index.sample_ids[:n], self.index.lengths[:n]
        by_id = np.argsort(ids, kind="stable")
        pairs = np.stack([ids[by_id], lengths[by_id]]).astype(np.int64)
        return hashlib.sha256(pairs.tobytes()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.plan.seed,
                "sequences": len(self), "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Follow mode: the cache may have grown since the save; the index is first grown to the saved size
        (waiting for the cache stage if need be), then its first sequences must be the saved ones."""
        while self.plan.follow and len(self) < state["sequences"] and not self.source.complete:
            self.grow(wait=True)
        n = state["sequences"] if self.plan.follow else None
        same = ((state["sequences"] == len(self) or (self.plan.follow and state["sequences"] <= len(self)))
                and state.get("fingerprint") == self.fingerprint(n) and state["seed"] == self.plan.seed)
        if not same:
            raise CacheError("the stream state belongs to another cache or seed; resume with the same cache "
                             "and run.seed, or start a new run")
        self.epoch, self.position = state["epoch"], state["position"]
