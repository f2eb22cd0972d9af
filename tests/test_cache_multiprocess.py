"""Two processes (torchrun, CPU, gloo) cache exactly what one process caches.

Batches are planned globally in sample-id order and batch i goes to rank i % world_size,
so the content per sample id must be identical; each rank writes its own shards
(r000-*, r001-*) and the manifest lists them all.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cache_helpers import assert_same_cache, by_sample

from cache.schema import read_manifest
from pipeline.run_paths import cache_dir
from stages import cache_teacher, prepare

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["data.max_samples=24", "data.max_length=32", "data.eval_fraction=0.2", "cache.batch_size=2",
            "cache.shard_tokens=100", "cache.k=8", "cache.targets=topk+sampled", "cache.num_draws=8",
            "cache.router_topk=all", "cache.store=zarr"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_equal_one(make_config):
    single = make_config(*SETTINGS, "run.name=single")
    prepare.run(single)
    cache_teacher.run(single)

    multi = make_config(*SETTINGS, "run.name=multi")
    prepare.run(multi)
    overrides = [f"run.root={multi.run.root}", f"data.source={multi.data.source}", f"teacher.path={multi.teacher.path}",
                 *SETTINGS, "run.name=multi"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "run_pipeline.py", "cache", *overrides]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]

    for split in ("train", "eval"):
        one = cache_dir(single.run_dir, split)
        two = cache_dir(multi.run_dir, split)
        assert_same_cache(by_sample(two), by_sample(one))
        manifest = read_manifest(two)
        names = [s.name for s in manifest.shards]
        on_disk = sorted(p.name for p in two.iterdir() if p.name.endswith(".zarr") and not p.name.startswith("."))
        assert names == on_disk, "the manifest lists every shard on disk"
        assert {s.rank for s in manifest.shards} == {0, 1}, f"{split}: both ranks wrote shards"
        assert all(s.name.startswith(f"r{s.rank:03d}-") for s in manifest.shards)
        assert manifest.n_seqs == read_manifest(one).n_seqs
