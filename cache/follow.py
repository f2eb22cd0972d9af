"""Follow mode: the shards of a cache that is still being written, in commit order (``train.follow``).

A follower lists the cache stage's journals (and, at the end, its manifest) and exposes the
**settled** shards: the longest prefix of the commit order in which no shard can still appear.
The commit order is (shard index, rank): r000-00000, r001-00000, ..., r000-00001, ... with the
cache stage's rank count from the journals. A rank writes its shards in index order, so shard
(k, r) is settled once every shard before it in that order is journaled; when the manifest is
written every shard is. The prefix only grows, and its order is the one a finished cache lists,
so a plan built from it (cache/stream.py) is the same whether the shards were read while the
cache grew or after it was finished.

Only rank 0 of a training job lists (``share``: rank 0's value to every rank, e.g. a broadcast),
so N trainer ranks make one LIST per poll, not N.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cache.location import Location
from cache.schema import MANIFEST_NAME, CacheError, Manifest, ShardInfo, read_manifest
from cache.writer import read_journals


def commit_order(shards: list[ShardInfo]) -> list[ShardInfo]:
    return sorted(shards, key=lambda s: (shard_index(s.name), s.rank))


def shard_index(name: str) -> int:
    """The rank-local index of a shard name such as r003-00012.zarr."""
    return int(name.split("-", 1)[1].split(".", 1)[0])


def settled(journals: list[dict], complete: Manifest | None) -> list[ShardInfo]:
    """The shards no later commit can precede, in commit order (all of them once the manifest exists)."""
    if complete is not None:
        return commit_order(complete.shards)
    world = max([int(j.get("world_size", 1)) for j in journals], default=1)
    have = {(shard_index(s["name"]), int(s["rank"])): ShardInfo(**s) for j in journals for s in j["shards"]}
    out, k = [], 0
    while True:
        for rank in range(world):
            if (k, rank) not in have:
                return out
            out.append(have[(k, rank)])
        k += 1


class Follower:
    """What a growing cache holds so far; ``refresh`` lists again (rank 0), ``wait`` polls until it grows."""

    def __init__(self, location: Location, poll_s: float = 5.0, timeout_s: float = 0.0, is_main: bool = True,
                 share: Callable = lambda value: value):
        """``share(value)``: rank 0's ``value`` on every rank (the others pass None); the default: one process."""
        self.location, self.poll_s, self.timeout_s, self.is_main, self.share = location, poll_s, timeout_s, is_main, share
        self.shards: list[ShardInfo] = []
        self.identity: dict = {}
        self.complete = False

    def refresh(self) -> list[ShardInfo]:
        """The shards settled since the last call (collective: every rank calls it at the same point)."""
        identity, shards, complete = self.share(self._list() if self.is_main else None)
        known = [s.name for s in self.shards]
        if [s.name for s in shards[:len(known)]] != known:
            raise CacheError(f"{self.location} grew out of commit order (a resume with more cache ranks while "
                             f"training followed it?); train on the finished cache without train.follow")
        new = shards[len(known):]
        self.identity, self.shards, self.complete = identity, shards, complete
        return new

    def _list(self) -> tuple[dict, list[ShardInfo], bool]:
        manifest = read_manifest(self.location) if self.location.exists(MANIFEST_NAME) else None
        journals = read_journals(self.location)
        identity = manifest.identity if manifest else (journals[0]["identity"] if journals else {})
        return identity, settled(journals, manifest), manifest is not None

    def wait(self, for_what: str = "more shards") -> list[ShardInfo]:
        """Poll every ``poll_s`` until a shard settles or the cache completes; the new shards."""
        start = time.monotonic()
        while True:
            new = self.refresh()
            if new or self.complete:
                return new
            # rank 0's clock decides, for every rank: a rank that gave up alone would leave the others in a broadcast
            if self.timeout_s and self.share(self.is_main and time.monotonic() - start > self.timeout_s):
                raise CacheError(f"{self.location}: no {for_what} in {self.timeout_s:.0f} s (train.follow_timeout_s); "
                                 f"is the cache stage running?")
            time.sleep(self.poll_s)

    def as_manifest(self) -> Manifest:
        """The shards so far as a (not complete) manifest, for the reader."""
        return Manifest(identity=self.identity, store=self.identity["store"], fields=[], shards=list(self.shards),
                        complete=self.complete)
