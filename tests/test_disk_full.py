"""A full disk during the cache stage: one line naming the directory and the space needed, the
partial shard removed, the committed shards kept, and the same command resumes to the cache an
uninterrupted run gives (both stores).

ENOSPC is simulated (the free-space check, or a store write that fails half-way), and where
this process may mount a tmpfs (root), also hit for real on a small one.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections import namedtuple

import pytest
from cache_helpers import assert_same_cache, by_sample

import run_pipeline
from cache import h5_store, zarr_store
from cache.writer import committed_shards

SMALL = ["data.max_samples=24", "data.max_length=24", "data.eval_fraction=0", "cache.splits=[train]", "cache.k=8",
         "cache.batch_size=2", "cache.shard_tokens=60"]
STORES = {"zarr": zarr_store, "hdf5": h5_store}
Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def cache_cli(tmp_path, text_jsonl, tokenizer_dir, make_model, capsys):
    """cache_cli(command, name, *overrides) → (exit code, the error line or '')."""

    def run(command: str, name: str, *overrides: str, root=tmp_path / "runs") -> tuple[int, str]:
        capsys.readouterr()
        code = run_pipeline.main([command, f"run.root={root}", f"run.name={name}", f"data.source={text_jsonl}",
                                  f"data.tokenizer={tokenizer_dir}", f"teacher.path={make_model('qwen3_moe')}",
                                  *SMALL, *overrides])
        err = capsys.readouterr().err
        line = err.rsplit("error: ", 1)[1].rstrip("\n") if "error: " in err else ""
        assert "\n" not in line and "Traceback" not in err, err[-2000:]
        return code, line

    return run


def reference(cache_cli, tmp_path, store: str) -> dict:
    assert cache_cli("prepare", "reference")[0] == 0
    assert cache_cli("cache", "reference", f"cache.store={store}")[0] == 0
    return by_sample(tmp_path / "runs" / "reference" / "cache")


def fail_from_third_shard(monkeypatch, cache, store: str, how: str) -> None:
    """From the third shard on: the free-space check sees a full disk, or the store's write runs
    out of space half-way (after writing part of the shard, as a real ENOSPC does)."""
    calls = []
    if how == "free_space":
        real = shutil.disk_usage

        def disk_usage(path):
            if os.path.samefile(path, cache):
                calls.append(path)
                if len(calls) >= 3:
                    return Usage(1 << 30, (1 << 30) - 4096, 4096)
            return real(path)

        monkeypatch.setattr(shutil, "disk_usage", disk_usage)
        return
    real_write = STORES[store].write_shard

    def write_shard(path, arrays, *args):
        calls.append(path)
        if len(calls) < 3:
            return real_write(path, arrays, *args)
        real_write(path, {k: v for i, (k, v) in enumerate(arrays.items()) if i < 2}, *args)  # a partial shard
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(STORES[store], "write_shard", write_shard)


@pytest.mark.parametrize("how", ["free_space", "write"])
@pytest.mark.parametrize("store", ["zarr", "hdf5"])
def test_disk_full_is_one_line_and_resumes(cache_cli, tmp_path, monkeypatch, store, how):
    want = reference(cache_cli, tmp_path, store)
    assert cache_cli("prepare", "full")[0] == 0
    cache = tmp_path / "runs" / "full" / "cache"
    cache.mkdir(parents=True)
    with monkeypatch.context() as patch:
        fail_from_third_shard(patch, cache, store, how)
        for attempt in ("first", "retry while still full"):
            code, line = cache_cli("cache", "full", f"cache.store={store}")
            assert code == 2 and str(cache) in line and "MiB" in line and "re-run the same command" in line, (attempt, line)
            assert len(committed_shards(cache)) == 2, "the committed shards are kept"
            listed = {s.name for s in committed_shards(cache)}
            kept = listed | {"journal", "config.yaml"}  # the resolved config is saved at the cache's start
            assert {p.name for p in cache.iterdir()} == kept, "no partial or unlisted shard left"
    assert cache_cli("cache", "full", f"cache.store={store}") == (0, ""), "space is back: the same command resumes"
    assert_same_cache(by_sample(cache), want)


def can_mount_tmpfs(path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("store", ["zarr", "hdf5"])
def test_real_full_tmpfs(cache_cli, tmp_path, store):
    """A real ENOSPC on a small tmpfs (root only): one line, then remounted larger, the same command resumes."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        big = ["data.max_samples=300", "data.max_length=64", "cache.k=64", "cache.shard_tokens=2000"]
        assert cache_cli("prepare", "reference", *big)[0] == 0
        assert cache_cli("cache", "reference", *big, f"cache.store={store}")[0] == 0
        want = by_sample(tmp_path / "runs" / "reference" / "cache")
        n_shards = len(committed_shards(tmp_path / "runs" / "reference" / "cache"))
        subprocess.run(["mount", "-o", "remount,size=3m", str(mnt)], check=True)
        assert cache_cli("prepare", "full", *big, root=mnt)[0] == 0
        code, line = cache_cli("cache", "full", *big, f"cache.store={store}", root=mnt)
        cache = mnt / "full" / "cache"
        assert code == 2 and str(cache) in line and "MiB" in line, line
        assert 0 < len(committed_shards(cache)) < n_shards and not list(cache.glob(".*.tmp*"))
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        assert cache_cli("cache", "full", *big, f"cache.store={store}", root=mnt) == (0, "")
        assert_same_cache(by_sample(cache), want)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # lazy: this process may still map a file there


def test_disk_full_in_any_stage_is_one_line(cache_cli, tmp_path, monkeypatch):
    """Outside the cache writer (here prepare's datasets write): one line naming the stage, then the
    same command runs once space is back."""
    from stages import prepare

    real = prepare.save_split

    def full(out_dir, rows):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir / "data-00000-of-00001.arrow"))

    monkeypatch.setattr(prepare, "save_split", full)
    code, line = cache_cli("prepare", "demo")
    assert code == 2 and "no space left on device" in line and "'prepare' stage" in line and "re-run" in line
    monkeypatch.setattr(prepare, "save_split", real)
    assert cache_cli("prepare", "demo") == (0, "")
