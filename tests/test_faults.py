"""Fault trials (issue 16): flipped bytes in a shard chunk, in manifest.json and in a checkpoint
are each caught with one line and a non-zero exit, never decoded, trained on or executed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import run_pipeline
from cache.reader import CacheReader
from cache.schema import CacheError, read_manifest
from cache.stream import CacheSource, ShardStream, StreamPlan
from stages.cache_teacher import cache_dir

SHARD_ARRAYS = ("draw_ids", "router_probs", "topk_logprobs", "log_partition")


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def flip_in_chunk(shard: Path, array: str) -> None:
    """Flip one byte in the middle of the first stored chunk of ``array`` (Zarr file or HDF5 extent)."""
    if shard.is_dir():
        chunk = min((p for p in (shard / array).rglob("*") if p.is_file() and p.name != "zarr.json"), key=str)
        flip_byte(chunk, chunk.stat().st_size // 2)
        return
    with h5py.File(shard, "r") as f:
        info = f[array].id.get_chunk_info(0)
    flip_byte(shard, info.byte_offset + info.size // 2)


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = run_pipeline.main(argv)
    err = capsys.readouterr().err
    assert code != 0, "the fault went unnoticed (exit 0)"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # beside transformers' bars
    assert len(errors) == 1 and "Traceback" not in err, f"not one line: {err[-2000:]!r}"
    return errors[0]


@pytest.fixture(params=["zarr", "hdf5"])
def cache_copy(request, cached_run, tmp_path) -> Path:
    """A copy of a real small cache (top-k + draws + router, two temperatures) on each store."""
    run_dir, _ = cached_run(f"cache.store={request.param}")
    dest = tmp_path / "cache"
    shutil.copytree(cache_dir(run_dir, "train"), dest)
    return dest


# --- shards -----------------------------------------------------------------------------------


@pytest.mark.parametrize("array", SHARD_ARRAYS)
def test_a_flipped_byte_in_a_shard_chunk_stops_the_training_reader(cache_copy, array):
    reader = CacheReader(cache_copy)
    name = reader.shards[-1].name
    want = reader.read_shard(name)
    assert array in reader.manifest.fields
    flip_in_chunk(cache_copy / name, array)
    with pytest.raises(CacheError) as err:  # the path train takes: the source, its index, the stream
        ShardStream(CacheSource(cache_copy), StreamPlan(batch_size=2, shuffle_window=0))
    message = str(err.value)
    assert "\n" not in message and str(cache_copy / name) in message and "checksum mismatch" in message
    assert "inspect" in message and "--verify" in message and "--force" in message
    # the flip is real: unchecked, the shard decodes to other numbers or fails to decode at all
    unchecked = CacheReader(cache_copy, verify=False)
    try:
        got = unchecked.read_shard(name)
    except Exception:  # noqa: BLE001 - a decode error is the other outcome of a flipped byte
        return
    assert not np.array_equal(getattr(got, array), getattr(want, array), equal_nan=True)


def test_a_removed_shard_is_named(cache_copy):
    name = CacheReader(cache_copy).shards[0].name
    target = cache_copy / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CacheError, match=rf"{name} is damaged \(missing\)"):
        CacheSource(cache_copy).index()


def test_a_clean_cache_is_hashed_once_per_shard(cache_copy, monkeypatch):
    import cache.reader as reader_module

    calls = []
    real = reader_module.checksum
    monkeypatch.setattr(reader_module, "checksum", lambda path: calls.append(path.name) or real(path))
    source = CacheSource(cache_copy)
    stream = ShardStream(source, StreamPlan(batch_size=2, shuffle_window=0))  # index(): reads, then closes
    stream.load(np.arange(len(stream)))  # every sequence, after the handles were closed and reopened
    assert sorted(calls) == sorted(s.name for s in source.reader.shards)


@pytest.mark.slow
def test_train_on_a_corrupt_shard_exits_with_one_line(train_config, capsys):
    cfg, overrides = train_config("train.router_weight=0.1", with_overrides=True)
    cache = cache_dir(cfg.run_dir, "train")
    name = CacheReader(cache).shards[1].name
    flip_in_chunk(cache / name, "topk_logprobs")
    err = one_line_error(capsys, ["train", *overrides])
    assert name in err and "checksum mismatch" in err
    assert not (cfg.run_dir / "train" / "final").exists()


# --- the manifest -----------------------------------------------------------------------------


def manifest_faults(text: str) -> dict[str, str]:
    """Byte flips at spread offsets, truncations, and value changes that keep the JSON valid."""
    rng = np.random.default_rng(0)
    out = {}
    for offset in rng.choice(len(text), size=12, replace=False):
        b = bytearray(text.encode())
        b[int(offset)] ^= 1 << int(rng.integers(0, 8))
        out[f"flip@{offset}"] = b.decode("latin-1")
    for keep in (0, len(text) // 3, len(text) - 2):
        out[f"truncated@{keep}"] = text[:keep]
    data = json.loads(text)
    changed = [("n_tokens", lambda d: d["shards"][0].update(n_tokens=d["shards"][0]["n_tokens"] + 1)),
               ("k", lambda d: d["identity"].update(k=d["identity"]["k"] * 2)),
               ("shard dropped", lambda d: d["shards"].pop()),
               ("shard checksum", lambda d: d["shards"][0].update(checksum="0" * 64)),
               ("checksum removed", lambda d: d.pop("checksum"))]
    for what, change in changed:
        d = json.loads(text)
        change(d)
        out[what] = json.dumps(d, indent=1, sort_keys=True)
    assert data == json.loads(text)
    return out


def test_every_manifest_fault_is_one_line_naming_the_file(cache_copy):
    path = cache_copy / "manifest.json"
    text = path.read_text()
    read_manifest(cache_copy)  # the intact one reads
    for what, damaged in manifest_faults(text).items():
        if damaged == text:
            continue
        path.write_bytes(damaged.encode("latin-1"))
        with pytest.raises(CacheError) as err:
            read_manifest(cache_copy)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and "--force" in message, (what, message)
    path.write_text(text)
    read_manifest(cache_copy)


def test_a_corrupt_manifest_stops_inspect_and_train(train_config, capsys):
    cfg, overrides = train_config(with_overrides=True)
    path = cache_dir(cfg.run_dir, "train") / "manifest.json"
    data = json.loads(path.read_text())
    data["shards"][0]["n_seqs"] += 1  # valid JSON, a plausible value
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
    assert str(path) in one_line_error(capsys, ["inspect", str(path.parent)])
    assert "no longer matches its checksum" in one_line_error(capsys, ["train", *overrides])
