"""Resume: SIGKILL the cache stage at several moments, re-run it, compare with an uninterrupted run.

The killed runs are real subprocesses (``python run_pipeline.py cache ...``). Batches are
fixed (sample-id order, one world size), so the resumed cache must equal the uninterrupted
one exactly, per sample id: no sequence missing, none duplicated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cache_helpers import assert_same_cache, by_sample

from cache.schema import read_manifest
from cache.writer import committed_shards
from pipeline.run_paths import cache_dir
from stages import cache_teacher, prepare

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["data.max_samples=48", "data.max_length=32", "data.eval_fraction=0", "cache.splits=[train]",
            "cache.batch_size=1", "cache.shard_tokens=64", "cache.chunk_tokens=16", "cache.k=8",
            "cache.targets=topk+sampled", "cache.num_draws=8", "cache.router_topk=all", "cache.store=hdf5"]


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def start(overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_pipeline.py", "cache", *overrides], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    """SIGKILL the process as soon as ``ready()`` holds (polled every 2 ms)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "the kill point never came"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def n_committed(cache: Path) -> int:
    return len(committed_shards(cache)) if (cache / "journal").exists() else 0


def state_status(run_dir: Path) -> str:
    path = run_dir / "state" / "cache.json"  # written atomically: never half a file
    return json.loads(path.read_text())["status"] if path.exists() else ""


@pytest.mark.slow
def test_killed_cache_resumes_to_the_uninterrupted_result(make_config, tmp_path):
    reference_cfg = make_config(*SETTINGS, "run.name=reference")
    prepare.run(reference_cfg)
    cache_teacher.run(reference_cfg)
    reference = by_sample(cache_dir(reference_cfg.run_dir, "train"))
    reference_shards = read_manifest(cache_dir(reference_cfg.run_dir, "train")).shards
    total_shards = len(reference_shards)

    cfg = make_config(*SETTINGS, "run.name=killed")
    prepare.run(cfg)
    overrides = [f"run.root={cfg.run.root}", f"data.source={cfg.data.source}", f"teacher.path={cfg.teacher.path}",
                 *SETTINGS, "run.name=killed"]
    cache = cache_dir(cfg.run_dir, "train")

    # 1. very early: the teacher is loaded, the stage is running, nothing is committed yet
    kill_when(start(overrides), lambda: state_status(cfg.run_dir) == "running")
    assert n_committed(cache) == 0
    # 2. right after the first shard commit (the resumed run goes on from there)
    kill_when(start(overrides), lambda: n_committed(cache) >= 1)
    assert 1 <= n_committed(cache) < total_shards, "the kill must land mid-way for the test to mean anything"
    assert not (cache / "manifest.json").exists(), "a killed run never wrote the manifest"

    done = subprocess.run([sys.executable, "run_pipeline.py", "cache", *overrides], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(cache)
    assert manifest.complete and len(manifest.shards) == total_shards
    layout = [(s.name, s.n_seqs, s.n_tokens) for s in manifest.shards]
    assert layout == [(s.name, s.n_seqs, s.n_tokens) for s in reference_shards], "the same shard boundaries"
    assert_same_cache(by_sample(cache), reference)
    assert not list(cache.glob(".*.tmp*")), "no half-written shard left behind"


def test_shard_bytes_bounds_the_shards_and_the_stage_ends_with_a_summary(make_config, capsys):
    """cache.shard_bytes cuts more, smaller shards (a batch split between two) holding the same sequences;
    the stage's last line gives each split's sequences, tokens, shards and bytes/token on disk."""
    base = [*SETTINGS[:4], "cache.batch_size=4", "cache.k=8", "cache.store=hdf5", "cache.splits=[train]"]
    caches = {}
    for name, limit in (("tokens", []), ("bytes", ["cache.shard_bytes=20000"])):
        cfg = make_config(*base, *limit, f"run.name={name}")
        prepare.run(cfg)
        manifest = cache_teacher.run(cfg)["train"]
        caches[name] = (cache_dir(cfg.run_dir, "train"), manifest)
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cache: ")]
    assert len(out) == 2
    (tokens_dir, by_tokens), (bytes_dir, by_bytes) = caches["tokens"], caches["bytes"]
    assert len(by_bytes.shards) > len(by_tokens.shards)
    assert any(s.n_seqs % 4 for s in by_bytes.shards[:-1]), "a batch of 4 split between two shards"
    assert_same_cache(by_sample(bytes_dir), by_sample(tokens_dir))
    size = sum(s.nbytes for s in by_bytes.shards)
    assert (f"train {by_bytes.n_seqs:,} sequences, {by_bytes.n_tokens:,} tokens in {len(by_bytes.shards)} shards "
            f"({size / 2**20:,.1f} MiB, {size / by_bytes.n_tokens:,.1f} bytes/token)") in out[1]
