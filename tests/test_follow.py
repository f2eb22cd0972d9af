"""Follow mode (train.follow): training on a cache while the cache stage writes it.

The guarantee (docs/training.md, "Follow mode"): epoch 0 takes the shards in commit order, its
shuffle windows and steps are planned once they are whole, so the steps a follower takes while
the cache grows are exactly the steps of the same plan over the finished cache; an end-to-end
run (a cache process and a train process started together) ends with the identical student.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_cache_resume import REPO, subprocess_env
from test_stores import teacher_batch

from cache.codec import Codec
from cache.follow import Follower, settled
from cache.location import Location
from cache.schema import CacheError, ShardInfo, sequences_from_flat
from cache.stream import CacheSource, ShardStream, StreamPlan
from cache.writer import CacheWriter, committed_shards, finalize

IDENTITY = {"codec": Codec().to_dict(), "k": 8, "store": "zarr"}
FIELDS = ["input_ids", "loss_mask", "seq_offsets", "sample_ids", "topk_ids", "topk_logprobs", "target_logprob",
          "log_partition", "draw_offsets", "draw_ids", "draw_counts"]


def batches(n: int = 12) -> list[dict]:
    rng = np.random.default_rng(0)
    return [teacher_batch(rng, [int(x) for x in rng.integers(5, 30, 4)], 4 * i, k=8) for i in range(n)]


def plan(**kw) -> StreamPlan:
    return StreamPlan(**{"seed": 3, "batch_size": 5, "shuffle_window": 7, "follow": True, **kw})


def test_steps_taken_while_the_cache_grows_are_the_finished_caches_steps(tmp_path):
    """A follower alternating with a writer (a shard or two at a time) takes, step for step, what the
    same plan gives over the finished cache; with batch_tokens too."""
    for kw in ({}, {"batch_tokens": 90, "batch_size": 1}):
        location = Location(tmp_path / f"c{len(kw)}")
        taken, stream = [], None
        with CacheWriter(location, rank=0, identity=IDENTITY, store="zarr", codec=Codec(), shard_tokens=60,
                         chunk_tokens=16, compression="zstd", level=1) as writer:
            for i, batch in enumerate(batches()):
                writer.add(sequences_from_flat(batch))
                writer._wait()
                if stream is None and location.exists("journal/rank000.json"):
                    stream = ShardStream(CacheSource(location, Follower(location, poll_s=0.01)), plan(**kw))
                elif stream is not None and i % 2:
                    stream.grow()
                if stream is not None:
                    for step in stream.steps(0, stream.position):
                        taken.append(step_ids(stream, step))
                        stream.advance(step)
        assert stream is not None and taken, "the follower started before the cache was finished"
        finalize(location, IDENTITY, "zarr", FIELDS)
        stream.grow()
        assert stream.source.complete
        taken += [step_ids(stream, step) for step in stream.steps(0, stream.position)]
        finished = ShardStream(CacheSource(location), plan(**kw))
        assert taken == [step_ids(finished, step) for step in finished.steps(0)]
        assert len(taken) >= 5


def test_a_follower_resumed_from_its_state_takes_the_same_next_steps(tmp_path):
    """The state saved mid-way while the cache grew, loaded by a fresh follower that lists a larger cache:
    the next steps are the uninterrupted follower's; a state from another cache is refused."""
    location = Location(tmp_path / "c")
    data = batches()
    with CacheWriter(location, rank=0, identity=IDENTITY, store="zarr", codec=Codec(), shard_tokens=60,
                     chunk_tokens=16, compression="zstd", level=1) as writer:
        for batch in data[:6]:
            writer.add(sequences_from_flat(batch))
        writer._wait()
        first = ShardStream(CacheSource(location, Follower(location)), plan())
        steps = first.steps(0)
        assert len(steps) >= 2 and first.growing(0)
        first.advance(steps[0])
        state = first.state_dict()
        for batch in data[6:]:
            writer.add(sequences_from_flat(batch))
    finalize(location, IDENTITY, "zarr", FIELDS)
    resumed = ShardStream(CacheSource(location, Follower(location)), plan())  # lists the finished cache
    assert len(resumed) > state["sequences"]
    resumed.load_state_dict(state)
    first.grow()
    want = [step_ids(first, s) for s in first.steps(0, first.position)]
    assert [step_ids(resumed, s) for s in resumed.steps(0, resumed.position)] == want
    other = dict(state, fingerprint="0" * 16)
    with pytest.raises(CacheError, match="belongs to another cache"):
        ShardStream(CacheSource(location, Follower(location)), plan()).load_state_dict(other)


def step_ids(stream: ShardStream, step: np.ndarray) -> list[int]:
    return stream.index.sample_ids[step].tolist()


def info(rank: int, index: int) -> dict:
    return {"name": f"r{rank:03d}-{index:05d}.zarr", "rank": rank, "n_tokens": 1, "n_seqs": 1, "nbytes": 1,
            "checksum": ""}


def test_settled_shards_wait_for_every_rank_of_the_cache_stage():
    journals = [{"world_size": 2, "shards": [info(0, 0), info(0, 1), info(0, 2)]},
                {"world_size": 2, "shards": [info(1, 0)]}]
    assert [s.name for s in settled(journals, None)] == ["r000-00000.zarr", "r001-00000.zarr", "r000-00001.zarr"]
    assert settled(journals[:1], None)[0].name == "r000-00000.zarr" and len(settled(journals[:1], None)) == 1


def test_a_cache_that_grows_out_of_commit_order_is_refused(tmp_path):
    location = Location(tmp_path)
    follower = Follower(location)
    location.write_whole("journal/rank000.json", json.dumps(
        {"identity": IDENTITY, "world_size": 1, "shards": [info(0, 0), info(0, 1)]}).encode())
    assert [s.name for s in follower.refresh()] == ["r000-00000.zarr", "r000-00001.zarr"]
    # a resume of the cache stage with two ranks: r001-00000 sorts before r000-00001, already consumed
    location.write_whole("journal/rank000.json", json.dumps(
        {"identity": IDENTITY, "world_size": 2, "shards": [info(0, 0), info(0, 1)]}).encode())
    location.write_whole("journal/rank001.json", json.dumps(
        {"identity": IDENTITY, "world_size": 2, "shards": [info(1, 0)]}).encode())
    with pytest.raises(CacheError, match="grew out of commit order"):
        follower.refresh()
    assert isinstance(follower.shards[0], ShardInfo)


def test_a_follower_without_a_cache_stage_times_out_with_one_line(tmp_path):
    follower = Follower(Location(tmp_path), poll_s=0.01, timeout_s=0.05)
    with pytest.raises(CacheError, match=r"no first committed shard in 0 s \(train.follow_timeout_s\)"):
        CacheSource(Location(tmp_path), follower)


FOLLOW = ["data.max_length=64", "data.max_samples=120", "data.eval_fraction=0", "cache.splits=[train]",
          "cache.batch_size=2", "cache.shard_tokens=200", "cache.chunk_tokens=64", "cache.k=8",
          "train.batch_size=4", "train.steps=34", "train.log_every=10", "train.checkpoint_every=100",
          "train.warmup_steps=1", "train.lr=1e-3", "train.shuffle_window=6", "train.num_workers=0",
          "train.follow=true", "train.follow_poll_s=0.1", "train.follow_timeout_s=300"]


@pytest.mark.slow
def test_a_student_trained_while_the_cache_is_written_equals_one_trained_after(make_config, student_path, tmp_path):
    """`train train.follow=true` started first (it waits for the first shard), then `cache` (paused with
    SIGSTOP once a few shards are committed, until the trainer plans steps on them): the follower trains
    while the cache is incomplete, goes on past its manifest into epoch 1, and ends with the student of
    `train train.follow=true` on the finished cache, bit for bit."""
    from safetensors.numpy import load_file

    from stages import prepare

    cfg = make_config(*FOLLOW, "run.name=live", f"student.path={student_path}")
    prepare.run(cfg)
    base = [f"run.root={cfg.run.root}", f"data.source={cfg.data.source}", f"teacher.path={cfg.teacher.path}",
            f"student.path={student_path}", *FOLLOW]

    def run(command: str, name: str, *extra: str) -> subprocess.Popen:
        err = open(tmp_path / f"{command}-{name}.err", "w")
        return subprocess.Popen([sys.executable, "run_pipeline.py", command, *base, f"run.name={name}", *extra],
                                cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=err, text=True)

    def errors(command: str, name: str) -> str:
        return (tmp_path / f"{command}-{name}.err").read_text()[-3000:]

    train = run("train", "live", "train.num_workers=1")  # a worker forked per batch of new shards
    lines = []
    while not any(line.startswith("follow: waiting") for line in lines):  # then nothing is committed yet
        lines.append(train.stdout.readline())
        assert lines[-1], f"the trainer stopped: {errors('train', 'live')}"
    cache = run("cache", "live")
    # pause the cache stage once a few shards are committed, until the trainer has planned steps on them:
    # the overlap is then certain, whatever the two processes' speeds
    journaled = lambda: sum(s.n_seqs for s in committed_shards(cfg.run_dir / "cache"))  # noqa: E731
    deadline = time.time() + 300
    while journaled() < 16:
        assert cache.poll() is None and time.time() < deadline, "the cache ended before the pause"
        time.sleep(0.01)
    os.kill(cache.pid, signal.SIGSTOP)
    try:
        while not any("still growing" in line for line in lines):
            lines.append(train.stdout.readline())
            assert lines[-1], f"the trainer stopped: {errors('train', 'live')}"
    finally:
        os.kill(cache.pid, signal.SIGCONT)
    assert cache.wait(timeout=600) == 0, errors("cache", "live")
    train_out, _ = train.communicate(timeout=600)
    assert train.returncode == 0, errors("train", "live")
    follow_lines = [line for line in lines + train_out.splitlines() if line.startswith("follow: ")]
    assert any("still growing" in line for line in follow_lines), follow_lines

    after = run("train", "after", f"cache.dir={cfg.run_dir}")  # the finished cache, in place, no worker
    after.communicate(timeout=600)
    assert after.returncode == 0, errors("train", "after")
    live = load_file(str(cfg.run_dir / "train" / "final" / "model.safetensors"))
    finished = load_file(str(cfg.run_dir.parent / "after" / "train" / "final" / "model.safetensors"))
    assert sorted(live) == sorted(finished)
    for name in live:
        np.testing.assert_array_equal(live[name], finished[name], err_msg=name)


def _follow_on_two_ranks(rank: int, port: int, cache: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def share(value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # rank 1 is pointed at a folder that does not exist: it can only know the shards from rank 0
    location = Location(cache if rank == 0 else f"{cache}-nowhere")
    follower = Follower(location, poll_s=0.01, is_main=rank == 0, share=share)
    names = [s.name for s in follower.wait()]
    Path(out, f"rank{rank}.json").write_text(json.dumps({"names": names, "complete": follower.complete}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_rank_0_lists_and_the_other_ranks_receive(tmp_path):
    import socket

    import torch.multiprocessing as mp

    location = Location(tmp_path / "c")
    location.write_whole("journal/rank000.json", json.dumps(
        {"identity": IDENTITY, "world_size": 1, "shards": [info(0, 0), info(0, 1)]}).encode())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_follow_on_two_ranks, args=(port, str(tmp_path / "c"), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1] == {"names": ["r000-00000.zarr", "r000-00001.zarr"], "complete": False}
