"""One conformance suite for both shard stores (Zarr v3, HDF5): every v2 field, the writer's shard cuts.

Every test that touches a store runs on both: the same arrays in, the same arrays out. The codecs
themselves (quantisers, id coding) are tested in tests/test_codec.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cache.codec import Codec
from cache.reader import CacheReader
from cache.schema import FIELDS, Manifest, sequences_from_flat, write_manifest
from cache.shards import checksum, commit_shard, open_shard, resolve_compression, shard_name
from cache.writer import CacheWriter, committed_sample_ids, committed_shards, finalize, read_journals

STORES = ("zarr", "hdf5")


def shard_arrays(rng: np.random.Generator, n_tokens: int = 37, k: int = 5, layers: int = 3, r: int = 4,
                 with_draws: bool = True) -> dict[str, np.ndarray]:
    """Every stored v2 field with a dtype its schema entry allows; the draw arrays may be empty."""
    lens = np.array([10, 20, n_tokens - 30])
    draw_n = rng.integers(1, 4, size=n_tokens) if with_draws else np.zeros(n_tokens, np.int64)
    per_token = np.concatenate([[0], np.cumsum(draw_n)])
    d = int(draw_n.sum())
    return {
        "input_ids": rng.integers(0, 500, n_tokens).astype(np.int32),
        "loss_mask": rng.integers(0, 2, n_tokens).astype(np.uint8),
        "seq_offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        "sample_ids": np.array([7, 3, 11], dtype=np.int64),
        "topk_ids": rng.integers(0, 500, (n_tokens, k)).astype(np.int32),
        "topk_logprobs": rng.integers(0, 65535, (n_tokens, k)).astype(np.uint16),
        "target_logprob": rng.integers(0, 65535, n_tokens).astype(np.uint16),
        "log_partition": rng.normal(size=(n_tokens, 1)).astype(np.float32),
        "draw_n": draw_n.astype(np.uint8),
        "seq_draw_offsets": per_token[np.concatenate([[0], np.cumsum(lens)])].astype(np.int64),
        "draw_ids": rng.integers(0, 500, d).astype(np.int32),
        "draw_counts": rng.integers(1, 60000, d).astype(np.uint16),
        "draw_logprobs": rng.integers(0, 255, d).astype(np.uint8),
        "router_ids": rng.integers(0, 8, (n_tokens, layers, r)).astype(np.uint8),
        "router_probs": rng.integers(0, 127, (n_tokens, layers, r)).astype(np.uint8),
    }


def commit(tmp_path: Path, store: str, arrays: dict, index: int = 0, chunk_tokens: int = 8):
    name = shard_name(store, 0, index)
    info = commit_shard(tmp_path, store, name, 0, arrays, chunk_tokens=chunk_tokens,
                        compression=resolve_compression(store, "auto"), level=3)
    return name, info


def assert_same(got, want: np.ndarray, name: str) -> None:
    got = np.asarray(got)
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    np.testing.assert_array_equal(got, want, err_msg=name)


def test_schema_dtypes_are_what_the_fixture_writes():
    arrays = shard_arrays(np.random.default_rng(0))
    assert set(arrays) == set(FIELDS)
    for name, data in arrays.items():
        assert str(data.dtype) in FIELDS[name].dtype.split("|"), name


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("with_draws", [True, False], ids=["draws", "empty-draws"])
def test_every_field_round_trips_exactly(tmp_path, store, with_draws):
    arrays = shard_arrays(np.random.default_rng(1), with_draws=with_draws)
    name, info = commit(tmp_path, store, arrays)
    shard = open_shard(tmp_path, store, name)
    assert set(shard.keys()) == set(arrays)
    for field, want in arrays.items():
        assert field in shard
        assert_same(shard[field][:], want, field)
    shard.close()
    assert (info.n_tokens, info.n_seqs) == (37, 3)
    assert info.nbytes > 0 and info.checksum == checksum(tmp_path / name)


@pytest.mark.parametrize("store", STORES)
def test_partial_slices_cross_chunk_bounds(tmp_path, store):
    arrays = shard_arrays(np.random.default_rng(2))
    name, _ = commit(tmp_path, store, arrays, chunk_tokens=4)
    shard = open_shard(tmp_path, store, name)
    for a, b in [(0, 1), (3, 9), (13, 37), (36, 37), (5, 5)]:
        for field in ("input_ids", "topk_ids", "topk_logprobs", "log_partition", "router_ids", "router_probs"):
            assert_same(shard[field][a:b], arrays[field][a:b], f"{field}[{a}:{b}]")
    shard.close()


@pytest.mark.parametrize("store", STORES)
def test_checksum_detects_one_changed_byte(tmp_path, store):
    name, info = commit(tmp_path, store, shard_arrays(np.random.default_rng(3)))
    path = tmp_path / name
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and "c" in p.parts)
    victim = files[len(files) // 2]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    assert checksum(path) != info.checksum


@pytest.mark.parametrize("store", STORES)
def test_reader_verify_names_the_corrupt_shard(tmp_path, store):
    arrays = shard_arrays(np.random.default_rng(4))
    infos = [commit(tmp_path, store, arrays, index=i)[1] for i in range(2)]
    identity = {"codec": Codec().to_dict()}
    write_manifest(tmp_path, Manifest(identity=identity, store=store, fields=sorted(arrays), shards=infos, complete=True))
    reader = CacheReader(tmp_path)
    assert reader.verify() == []
    reader.close()
    victim = tmp_path / infos[1].name
    if victim.is_file():
        data = bytearray(victim.read_bytes())
        data[-100] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        (victim / "zarr.json").write_text((victim / "zarr.json").read_text() + " ")
    assert CacheReader(tmp_path).verify() == [infos[1].name]


@pytest.mark.parametrize("store", STORES)
def test_commit_ignores_stale_tmp_and_overwrites_orphan(tmp_path, store):
    arrays = shard_arrays(np.random.default_rng(5))
    name = shard_name(store, 0, 0)
    # a crash mid-write (another pid) and a crash between rename and journal write
    stale_tmp = tmp_path / f".{name}.tmp999999"
    stale_tmp.mkdir() if store == "zarr" else stale_tmp.write_bytes(b"half a shard")
    orphan = tmp_path / name
    orphan.mkdir() if store == "zarr" else orphan.write_bytes(b"an orphan")
    if store == "zarr":
        (orphan / "junk").write_bytes(b"an orphan")
    _, info = commit(tmp_path, store, arrays)
    shard = open_shard(tmp_path, store, name)
    assert_same(shard["input_ids"][:], arrays["input_ids"], "input_ids")
    shard.close()
    assert not (orphan / "junk").exists()
    assert info.checksum == checksum(orphan)


@pytest.mark.parametrize("store", STORES)
def test_writer_cleans_its_stale_tmp_files_and_journals_commits(tmp_path, store):
    stale = tmp_path / f".{shard_name(store, 0, 0)}.tmp424242"
    stale.write_bytes(b"from a killed run")
    other_rank = tmp_path / f".{shard_name(store, 1, 0)}.tmp424242"
    other_rank.write_bytes(b"another rank's")
    rng = np.random.default_rng(6)
    batch = {k: v for k, v in shard_arrays(rng).items() if k in ("input_ids", "loss_mask", "sample_ids")}
    batch.update(seq_lens=np.array([10, 20, 7]), target_logprob=np.zeros(37, np.float32),
                 log_partition=np.zeros((37, 1), np.float32))
    identity = {"codec": Codec().to_dict(), "k": 0}
    with CacheWriter(tmp_path, rank=0, identity=identity, store=store, codec=Codec(), shard_tokens=30,
                     chunk_tokens=16, compression="none", level=0) as writer:
        writer.add(sequences_from_flat(batch))
        writer.add(sequences_from_flat({**batch, "sample_ids": batch["sample_ids"] + 100}))
    assert not stale.exists(), "a rank's writer removes its own leftovers"
    assert other_rank.exists(), "but never another rank's"
    # sequences of 10, 20, 7, 10, 20, 7 tokens, at most 30 per shard: [10, 20] [7, 10] [20, 7]
    assert [s.name for s in committed_shards(tmp_path)] == [shard_name(store, 0, i) for i in range(3)]
    assert [s.n_tokens for s in committed_shards(tmp_path)] == [30, 17, 27]
    manifest = finalize(tmp_path, identity, store, sorted(batch))
    assert manifest.n_seqs == 6 and manifest.n_tokens == 74
    assert read_journals(tmp_path)[0]["identity"] == identity



def teacher_batch(rng: np.random.Generator, lens: list[int], first_id: int, k: int, draws: int = 4) -> dict:
    """A batch record as the HF teacher hands it over (int32 ids, fp32 log-probs, per-token draws)."""
    t = int(sum(lens))
    draw_n = rng.integers(1, draws + 1, t)
    return {"sample_ids": np.arange(first_id, first_id + len(lens), dtype=np.int64), "seq_lens": np.array(lens),
            "input_ids": rng.integers(0, 500, t).astype(np.int64), "loss_mask": np.ones(t, np.uint8),
            "target_logprob": -rng.random(t).astype(np.float32), "log_partition": rng.random((t, 1), np.float32),
            "topk_ids": rng.integers(0, 50_000, (t, k)).astype(np.int32),
            "topk_logprobs": -rng.random((t, k), np.float32), "draw_n": draw_n,
            "draw_ids": rng.integers(0, 500, int(draw_n.sum())).astype(np.int32),
            "draw_counts": rng.integers(1, 5, int(draw_n.sum())).astype(np.int32),
            "draw_logprobs": -rng.random(int(draw_n.sum())).astype(np.float32)}


def write_batches(cache_dir: Path, batches: list[dict], stop_after: int | None = None, **limits) -> CacheWriter:
    """Write ``batches`` on one rank; ``stop_after`` shards: stop there as a killed run would (no flush)."""
    identity = {"codec": Codec().to_dict(), "k": int(batches[0]["topk_ids"].shape[1])}
    done = {int(i) for i in committed_sample_ids(cache_dir, "hdf5")} if (cache_dir / "journal").exists() else set()
    writer = CacheWriter(cache_dir, rank=0, identity=identity, store="hdf5", codec=Codec(), chunk_tokens=64,
                         compression="none", level=0, skip=done, **limits)
    with writer:
        for batch in batches:
            if stop_after is not None and len(committed_shards(cache_dir)) >= stop_after:
                writer._buffer.clear()  # a kill loses what was buffered
                break
            writer.add(sequences_from_flat({key: value.copy() for key, value in batch.items()}))
            writer._wait()
    return writer


def test_writer_memory_is_bounded_by_bytes_at_large_k(tmp_path, monkeypatch):
    """k = 2,048: each shard's buffered records stay under cache.shard_bytes (measured on the arrays the
    commit receives, not RSS), where a token bound alone holds the whole shard_tokens."""
    rng = np.random.default_rng(0)
    batches = [teacher_batch(rng, [61, 64, 40, 64], 4 * i, k=2048) for i in range(6)]
    per_token = sum(v.nbytes for v in batches[0].values()) / batches[0]["seq_lens"].sum()
    assert per_token > 16_000  # ids + fp32 log-probs at k = 2,048
    held = []
    real_commit = CacheWriter._commit
    def commit(self, records):  # what a commit receives: the buffered records of one shard
        held.append(sum(a.nbytes for r in records for a in r.arrays().values()))
        return real_commit(self, records)

    monkeypatch.setattr(CacheWriter, "_commit", commit)
    bound = 4 << 20
    writer = write_batches(tmp_path / "bytes", batches, shard_tokens=262_144, shard_bytes=bound)
    assert len(held) > 3 and max(held) <= bound and writer.peak_buffered_bytes == max(held)
    held.clear()
    write_batches(tmp_path / "tokens", batches, shard_tokens=262_144, shard_bytes=1 << 40)
    every = sum(v.nbytes for b in batches for v in sequences_from_flat(b).arrays().values())
    assert held == [every]  # one shard: every batch at once
    assert_same_sequences(tmp_path / "bytes", tmp_path / "tokens")


def assert_same_sequences(a: Path, b: Path) -> None:
    from cache_helpers import assert_same_cache, by_sample

    for path in (a, b):
        finalize(path, read_journals(path)[0]["identity"], "hdf5", ["input_ids", "loss_mask", "seq_offsets",
                 "sample_ids", "topk_ids", "topk_logprobs", "target_logprob", "draw_n", "seq_draw_offsets",
                 "draw_ids", "draw_counts", "draw_logprobs"])
    assert_same_cache(by_sample(a), by_sample(b))


def shard_layout(cache_dir: Path) -> list[list[int]]:
    shards = [open_shard(cache_dir, "hdf5", s.name) for s in committed_shards(cache_dir)]
    return [[int(i) for i in shard["sample_ids"][:]] for shard in shards]


@pytest.mark.parametrize("stop_after", [1, 2])
def test_resumed_writer_cuts_the_same_shards(tmp_path, stop_after):
    """Batches split across shards: a run stopped after a commit and resumed (re-adding every batch, the
    committed sequences skipped) ends with the uninterrupted run's shards, sequence for sequence."""
    rng = np.random.default_rng(1)
    batches = [teacher_batch(rng, [30, 50, 20], 3 * i, k=64) for i in range(5)]
    limits = {"shard_tokens": 10_000, "shard_bytes": 70 * (64 * 8 + 40)}
    write_batches(tmp_path / "whole", batches, **limits)
    reference = shard_layout(tmp_path / "whole")
    assert len(reference) >= 4 and any(len(s) > 1 for s in reference)
    assert any(s[0] % 3 for s in reference), "a batch (3 sequences) must straddle a shard boundary"
    write_batches(tmp_path / "resumed", batches, stop_after=stop_after, **limits)
    assert stop_after <= len(shard_layout(tmp_path / "resumed")) < len(reference)
    write_batches(tmp_path / "resumed", batches, **limits)
    assert shard_layout(tmp_path / "resumed") == reference
    assert_same_sequences(tmp_path / "resumed", tmp_path / "whole")

def test_stale_tmp_name_pattern_matches_commit_shard():
    """The cleanup pattern in CacheWriter must match the tmp names commit_shard makes."""
    name = shard_name("hdf5", 3, 12)
    assert f".{name}.tmp{os.getpid()}".startswith(".r003-")


def test_a_v1_cache_is_refused_with_how_to_recreate_it(tmp_path):
    """Format v2 reads v2 only: a v1 manifest (as v1 wrote it, checksum and all) is one line naming the fix."""
    import json

    from cache.schema import CacheError, content_checksum

    content = {"format_version": 1, "complete": True, "store": "zarr", "fields": ["input_ids"], "shards": [],
               "identity": {"codec": {"ids": "sorted_delta", "values": "float16"}}}
    (tmp_path / "manifest.json").write_text(json.dumps({**content, "checksum": content_checksum(content)}))
    with pytest.raises(CacheError) as err:
        CacheReader(tmp_path)
    message = str(err.value)
    assert "version 1 is not supported" in message and "version 2 only" in message
    assert "run_pipeline.py cache --force" in message and "\n" not in message


@pytest.mark.parametrize("store", STORES)
def test_a_draw_chunk_spans_as_many_tokens_as_a_token_chunk(tmp_path, store):
    """1–3 draws per token: a draw array's chunk holds chunk_tokens × ceil(D / T) entries (not chunk_tokens:
    a reader would open ~D / T times more chunk files for the draws than for the head), read back exactly."""
    arrays = shard_arrays(np.random.default_rng(3), n_tokens=400)
    per_token = -(-len(arrays["draw_ids"]) // 400)
    assert per_token >= 2
    name, _ = commit(tmp_path, store, arrays, chunk_tokens=16)
    shard = open_shard(tmp_path, store, name)
    assert shard["topk_ids"].chunks[0] == 16 and shard["router_probs"].chunks[0] == 16
    assert all(shard[f].chunks[0] == 16 * per_token for f in ("draw_ids", "draw_counts", "draw_logprobs"))
    for field in ("draw_ids", "draw_counts", "draw_logprobs"):
        assert_same(shard[field][:], arrays[field], field)
    shard.close()
