"""Caches on S3-compatible object storage, against a real S3 API served locally (moto, tests/s3_server.py).

The store conformance checks of tests/test_stores.py, run through a ``Location`` on a bucket (the
zarr store: HDF5 stays local), the commit protocol without rename (a partial upload is never
listed and is overwritten), the reader's fetch-verify-prefetch path, and the cache stage killed
with SIGKILL mid-run and resumed on the bucket, equal to an uninterrupted local run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from cache_helpers import assert_same_cache, by_sample
from test_cache_resume import REPO, SETTINGS, kill_when, subprocess_env
from test_stores import assert_same, shard_arrays, teacher_batch

from cache import zarr_store
from cache.codec import Codec
from cache.location import Location
from cache.reader import CacheReader
from cache.schema import CacheError, Manifest, read_manifest, sequences_from_flat, write_manifest
from cache.shards import commit_shard, open_shard, resolve_compression, shard_name
from cache.stream import CacheSource, ShardStream, StreamPlan
from cache.writer import CacheWriter, committed_shards, finalize, read_journals

IDENTITY = {"codec": Codec().to_dict(), "k": 64}


def commit(location: Location, arrays: dict, index: int = 0, chunk_tokens: int = 8):
    name = shard_name("zarr", 0, index)
    return name, commit_shard(location, "zarr", name, 0, arrays, chunk_tokens=chunk_tokens,
                              compression=resolve_compression("zarr", "auto"), level=3)


def test_every_field_round_trips_and_checksums_as_on_disk(s3_bucket, tmp_path):
    """Lazy reads (fsspec's store) and whole-shard fetches give the arrays back; the checksum and size are the
    ones the same shard has on a local disk, so a cache copied between the two still verifies."""
    arrays = shard_arrays(np.random.default_rng(1))
    remote = Location(f"{s3_bucket}/c")
    name, info = commit(remote, arrays)
    _, local_info = commit(Location(tmp_path), arrays)
    assert (info.checksum, info.nbytes) == (local_info.checksum, local_info.nbytes)
    assert remote.checksum(name) == info.checksum and remote.nbytes(name) == info.nbytes
    lazy = open_shard(remote, "zarr", name)
    fetched = zarr_store.open_shard(remote.fetch(name))
    for field, want in arrays.items():
        assert_same(lazy[field][:], want, field)
        assert_same(fetched[field][:], want, field)
    for a, b in [(0, 1), (3, 9), (13, 37), (36, 37), (5, 5)]:
        assert_same(lazy["topk_ids"][a:b], arrays["topk_ids"][a:b], f"topk_ids[{a}:{b}]")


def write_manifest_for(location: Location, infos, arrays) -> None:
    write_manifest(location, Manifest(identity=IDENTITY, store="zarr", fields=sorted(arrays), shards=infos,
                                      complete=True))


def test_reader_verifies_the_bytes_it_decodes_and_names_a_corrupt_shard(s3_bucket):
    location = Location(f"{s3_bucket}/c")
    arrays = shard_arrays(np.random.default_rng(4))
    infos = [commit(location, arrays, index=i)[1] for i in range(3)]
    write_manifest_for(location, infos, arrays)
    reader = CacheReader(location)
    assert reader.verify() == []
    np.testing.assert_array_equal(reader.read_shard(infos[0].name).input_ids, arrays["input_ids"])
    chunk = f"{infos[1].name}/topk_logprobs/c/0/0"
    data = bytearray(location.read_bytes(chunk))
    data[len(data) // 2] ^= 0x01
    location.write_whole(chunk, bytes(data))
    assert CacheReader(location).verify() == [infos[1].name]
    with pytest.raises(CacheError, match=rf"{infos[1].name} is damaged \(checksum mismatch"):
        CacheReader(location).read_shard(infos[1].name)
    location.remove(infos[2].name)
    with pytest.raises(CacheError, match=rf"{infos[2].name} is damaged \(missing\)"):
        CacheReader(location).read_shard(infos[2].name)


def test_the_stream_prefetches_the_next_shards_of_the_epoch(s3_bucket):
    location = Location(f"{s3_bucket}/c")
    rng = np.random.default_rng(5)
    infos = []
    for i in range(5):
        arrays = shard_arrays(rng)
        arrays["sample_ids"] = arrays["sample_ids"] + 100 * i
        infos.append(commit(location, arrays, index=i)[1])
    write_manifest_for(location, infos, arrays)
    stream = ShardStream(CacheSource(location), StreamPlan(batch_size=3, shuffle_window=0, seed=1))
    order = stream.order(0)
    shard_sequence = list(dict.fromkeys(stream.index.shard[order].tolist()))
    first = order[:3]  # within the epoch's first shard
    out = stream.load(first, epoch=0)
    reader = stream.source.reader
    ahead = sorted(reader._ahead)
    assert ahead == sorted(stream.source.names[i] for i in shard_sequence[1:3])
    assert list(out.sample_ids) == list(stream.index.sample_ids[first])
    rest = stream.load(order[3:], epoch=0)  # the prefetched shards are taken, verified, from the pool
    assert not reader._ahead and sorted(reader._verified) == sorted(i.name for i in infos)
    assert sorted(np.concatenate([out.sample_ids, rest.sample_ids])) == sorted(stream.index.sample_ids)


def write(location: Location, batches: list[dict], stop_after: int | None = None) -> None:
    """One rank's writer on zarr; ``stop_after`` shards: stop as a killed run would (no flush)."""
    done = {int(i) for s in committed_shards(location)
            for i in open_shard(location, "zarr", s.name)["sample_ids"][:]}
    with CacheWriter(location, rank=0, identity=IDENTITY, store="zarr", codec=Codec(), chunk_tokens=64,
                     compression="zstd", level=3, skip=done, shard_tokens=10_000,
                     shard_bytes=70 * (64 * 8 + 40)) as writer:
        for batch in batches:
            if stop_after is not None and len(committed_shards(location)) >= stop_after:
                writer._buffer.clear()
                break
            writer.add(sequences_from_flat({key: value.copy() for key, value in batch.items()}))
            writer._wait()


def test_a_partial_upload_is_never_listed_and_a_resume_overwrites_it(s3_bucket, tmp_path):
    """A run killed mid-upload leaves objects under the next shard's final name and no journal entry for
    them: not data (readers list journals). The resumed run uploads that shard again, whole, and ends
    with the uninterrupted run's shards, byte for byte."""
    rng = np.random.default_rng(1)
    batches = [teacher_batch(rng, [30, 50, 20], 3 * i, k=64) for i in range(5)]
    whole, resumed = Location(tmp_path / "whole"), Location(f"{s3_bucket}/resumed")
    write(whole, batches)
    write(resumed, batches, stop_after=2)
    assert len(committed_shards(resumed)) == 2
    orphan = shard_name("zarr", 0, 2)
    resumed.write_whole(f"{orphan}/zarr.json", b"{half an upload")
    resumed.write_whole(f"{orphan}/stale/c/0", b"junk")
    assert [s.name for s in committed_shards(resumed)] == [shard_name("zarr", 0, i) for i in range(2)]
    write(resumed, batches)
    assert not resumed.names(f"{orphan}/stale/*"), "the orphan's objects are gone"
    reference = committed_shards(whole)
    assert [(s.name, s.n_seqs, s.checksum) for s in committed_shards(resumed)] == \
           [(s.name, s.n_seqs, s.checksum) for s in reference]
    for location in (whole, resumed):
        finalize(location, read_journals(location)[0]["identity"], "zarr", sorted(batches[0]))
    assert read_manifest(resumed).complete
    assert_same_cache(by_sample(resumed), by_sample(whole))


def test_hdf5_on_a_url_is_one_line(s3_bucket, capsys):
    from fault_helpers import one_line_error

    line = one_line_error(capsys, ["cache", f"cache.dir={s3_bucket}/x", "cache.store=hdf5"])
    assert "cache.store=hdf5 needs a local cache.dir" in line and "cache.store=zarr" in line
    line = one_line_error(capsys, ["cache", "cache.storage_options={endpoint_url: x}"])
    assert "cache.storage_options is set but cache.dir is not a URL" in line
    line = one_line_error(capsys, ["cache", "cache.dir=nosuchproto://b/x"])
    assert "fsspec knows no protocol 'nosuchproto'" in line


S3_SETTINGS = [s for s in SETTINGS if not s.startswith(("cache.store", "data.max_samples", "cache.shard_tokens"))] + [
    "cache.store=zarr", "data.max_samples=24", "cache.shard_tokens=128"]  # ~8 shards: fewer round trips


@pytest.mark.slow
def test_killed_cache_on_s3_resumes_to_the_uninterrupted_result(make_config, s3_bucket):
    """The cache stage on a bucket, SIGKILLed after its first commit, then re-run: the same shards as an
    uninterrupted run on a local disk (names, sequences, checksums), and nothing but listed shards,
    journals, manifest and config left under the prefix."""
    from pipeline.run_paths import cache_dir, cache_location
    from stages import cache_teacher, prepare

    reference_cfg = make_config(*S3_SETTINGS, "run.name=reference")
    prepare.run(reference_cfg)
    cache_teacher.run(reference_cfg)
    reference_dir = cache_dir(reference_cfg.run_dir, "train")
    reference = read_manifest(reference_dir).shards

    url = f"{s3_bucket}/runs"
    cfg = make_config(*S3_SETTINGS, "run.name=killed", f"cache.dir={url}")
    prepare.run(cfg)
    overrides = [f"run.root={cfg.run.root}", f"data.source={cfg.data.source}", f"teacher.path={cfg.teacher.path}",
                 *S3_SETTINGS, "run.name=killed", f"cache.dir={url}"]
    location = cache_location(cfg, "train")
    proc = subprocess.Popen([sys.executable, "run_pipeline.py", "cache", *overrides], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # polled every ~50 ms, not 2: moto serves from this process, and a busy poll would slow the run it watches
    kill_when(proc, lambda: time.sleep(0.05) or len(committed_shards(location)) >= 1, timeout=120)
    assert 1 <= len(committed_shards(location)) < len(reference), "the kill must land mid-way"
    assert not location.exists("manifest.json")

    done = subprocess.run([sys.executable, "run_pipeline.py", "cache", *overrides], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(location)
    assert manifest.complete
    assert [(s.name, s.n_seqs, s.n_tokens, s.checksum) for s in manifest.shards] == \
           [(s.name, s.n_seqs, s.n_tokens, s.checksum) for s in reference]
    assert_same_cache(by_sample(location), by_sample(reference_dir))
    listed = {s.name for s in manifest.shards}
    leftovers = [k for k in location.names("*") if k not in listed | {"journal", "manifest.json", "config.yaml"}]
    assert not leftovers, leftovers
    from stages import inspect_cache, status

    progress = status.status(cfg.run_dir)["caches"]["cache"]
    assert progress["complete"] and progress["shards"] == len(reference)
    assert inspect_cache.main(str(location), verify=True)["shards"] == len(reference)


@pytest.mark.slow
def test_train_and_eval_read_a_cache_on_s3_as_on_disk(train_config, s3_bucket):
    """The run's caches uploaded to a bucket (object for object): train and evaluate with cache.dir on the
    bucket give the student and the results of the same run on the local caches (every shard fetched,
    verified and prefetched through the object-store path)."""
    import fsspec
    from safetensors.numpy import load_file

    from stages import evaluate, train_student

    settings = ("train.steps=3", "train.num_workers=1", "eval.run_teacher=false", "eval.before=false")
    local = train_config(*settings, name="local")
    fs = fsspec.filesystem("s3")
    for name in ("cache", "cache_eval"):
        for path in sorted(p for p in (local.run_dir / name).rglob("*") if p.is_file()):
            fs.pipe_file(f"{s3_bucket[5:]}/runs/{path.relative_to(local.run_dir)}", path.read_bytes())
    remote = train_config(*settings, f"cache.dir={s3_bucket}/runs", name="remote")
    for name in ("cache", "cache_eval"):
        shutil.rmtree(remote.run_dir / name)  # nothing local to fall back on
    finals = [train_student.run(cfg) for cfg in (local, remote)]
    want, got = (load_file(str(f / "model.safetensors")) for f in finals)
    assert sorted(want) == sorted(got)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert evaluate.run(remote) == evaluate.run(local)


def test_an_unreachable_store_is_one_line(s3_bucket):
    from s3_server import free_port

    from cache.location import StorageError

    nowhere = Location(f"{s3_bucket}/x", {"endpoint_url": f"http://127.0.0.1:{free_port()}",
                                          "config_kwargs": {"retries": {"max_attempts": 1}}})
    with pytest.raises(StorageError, match=r"cannot reach s3://.*/x \(EndpointConnectionError: .*check the credentials"):
        read_manifest(nowhere)
