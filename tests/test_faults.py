"""Fault trials (issue 16): flipped bytes in a shard chunk, in manifest.json and in a checkpoint
are each caught with one line and a non-zero exit, never decoded, trained on or executed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache.reader import CacheReader
from cache.schema import CacheError, read_manifest
from cache.stream import CacheSource, ShardStream, StreamPlan
from fault_helpers import Payload, flip_byte, one_line_error, rewrite_checksums
from pipeline.run_paths import cache_dir

SHARD_ARRAYS = ("draw_ids", "router_probs", "topk_logprobs", "log_partition")


def flip_in_chunk(shard: Path, array: str) -> None:
    """Flip one byte in the middle of the first stored chunk of ``array`` (Zarr file or HDF5 extent)."""
    if shard.is_dir():
        chunk = min((p for p in (shard / array).rglob("*") if p.is_file() and p.name != "zarr.json"), key=str)
        flip_byte(chunk, chunk.stat().st_size // 2)
        return
    with h5py.File(shard, "r") as f:
        info = f[array].id.get_chunk_info(0)
    flip_byte(shard, info.byte_offset + info.size // 2)


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
    assert not np.array_equal(got.arrays()[array], want.arrays()[array], equal_nan=True)


def test_a_removed_shard_is_named(cache_copy):
    name = CacheReader(cache_copy).shards[0].name
    target = cache_copy / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CacheError, match=rf"{name} is damaged \(missing\)"):
        CacheSource(cache_copy).index()


def test_a_clean_cache_is_hashed_once_per_shard(cache_copy, monkeypatch):
    from cache.location import Location

    calls = []
    real = Location.checksum
    monkeypatch.setattr(Location, "checksum", lambda self, name: calls.append(name) or real(self, name))
    source = CacheSource(cache_copy)
    stream = ShardStream(source, StreamPlan(batch_size=2, shuffle_window=0))  # index(): reads, then closes
    stream.load(np.arange(len(stream)))  # every sequence, after the handles were closed and reopened
    assert sorted(calls) == sorted(s.name for s in source.reader.shards)


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


def test_every_manifest_fault_is_one_line_naming_the_file(cache_copy, capsys):
    path = cache_copy / "manifest.json"
    text = path.read_text()
    read_manifest(cache_copy)  # the intact one reads
    for what, damaged in manifest_faults(text).items():
        assert damaged != text, what
        path.write_bytes(damaged.encode("latin-1"))
        with pytest.raises(CacheError) as err:
            read_manifest(cache_copy)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and "--force" in message, (what, message)
        assert str(path) in one_line_error(capsys, ["inspect", str(cache_copy)]), what  # exit 2, one line
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


# --- checkpoints ------------------------------------------------------------------------------


def tiny_trainer(seed: int = 0):
    """(accelerator, model, optimizer, scheduler) of one process, prepared as the train stage prepares them."""
    import torch

    from pipeline import checkpoint
    from pipeline.distributed import prepare, training_accelerator

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    accelerator = training_accelerator("ddp", True, "no", None, "unused")
    model, optimizer = prepare(accelerator, model, optimizer, scheduler)
    checkpoint.attach(accelerator)
    return accelerator, model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, n: int) -> None:
    import torch

    for _ in range(n):
        model(torch.randn(3, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def checkpoints_at(root: Path, steps=(1, 2)) -> dict[int, dict]:
    """Checkpoints of a tiny trainer at ``steps``; returns each step's weights."""
    from pipeline import checkpoint

    accelerator, model, optimizer, scheduler = tiny_trainer()
    weights, done = {}, 0
    for step in steps:
        train_steps(model, optimizer, scheduler, step - done)
        done = step
        checkpoint.save(accelerator, root, step, {"epoch": 0, "position": step}, keep=5, parallel="ddp")
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return weights


def read_latest(root: Path, seed: int = 1, warnings: list | None = None):
    """(loaded, accelerator, model) for a fresh tiny trainer."""
    from pipeline import checkpoint

    accelerator, model, _, _ = tiny_trainer(seed)
    warn = warnings.append if warnings is not None else print
    return checkpoint.read_latest(root, accelerator, model, "ddp", warn=warn), accelerator, model


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl", "progress.json",
                                    "random_states_0.pkl", "COMPLETE"])
def test_a_flipped_byte_in_the_newest_checkpoint_falls_back_to_the_previous(tmp_path, victim):
    import torch

    from pipeline import checkpoint

    weights = checkpoints_at(tmp_path)
    target = tmp_path / "step-000002" / victim
    flip_byte(target, target.stat().st_size // 2)
    warnings = []
    loaded, accelerator, model = read_latest(tmp_path, warnings=warnings)
    assert loaded.path.name == "step-000001" and len(warnings) == 1
    assert "step-000002" in warnings[0] and "\n" not in warnings[0]
    assert victim in warnings[0] or victim == "COMPLETE"  # a flipped recorded hash names the file it guards
    checkpoint.apply(loaded, accelerator)
    assert all(torch.equal(model.state_dict()[k], weights[1][k]) for k in weights[1])


def test_no_good_checkpoint_is_one_line_and_changes_nothing(tmp_path):
    import torch

    from pipeline import checkpoint

    checkpoints_at(tmp_path)
    for path in checkpoint.complete_checkpoints(tmp_path):
        flip_byte(path / "model.safetensors", 100)
    accelerator, model, optimizer, scheduler = tiny_trainer(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    warnings = []
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.read_latest(tmp_path, accelerator, model, "ddp", warn=warnings.append)
    assert "no usable checkpoint" in str(err.value) and "\n" not in str(err.value) and len(warnings) == 1
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


@pytest.mark.parametrize("victim", ["optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"])
def test_a_planted_pickle_payload_is_refused_not_executed(tmp_path, victim):
    import torch
    from accelerate.utils import load

    checkpoints_at(tmp_path)
    newest, marker = tmp_path / "step-000002", tmp_path / "pwned"
    torch.save({**load(newest / victim), "extra": Payload(marker)}, newest / victim)
    rewrite_checksums(newest)
    warnings = []
    loaded, _, _ = read_latest(tmp_path, warnings=warnings)
    assert not marker.exists(), "the checkpoint ran code"
    assert loaded.path.name == "step-000001"
    assert victim in warnings[0] and "refused" in warnings[0]


def test_a_planted_payload_in_fsdp_metadata_is_refused_not_executed(tmp_path):
    """DCP unpickles its .metadata freely: the check admits its metadata classes only."""
    import pickle

    from pipeline import checkpoint

    dcp = tmp_path / "pytorch_model_fsdp_0"
    dcp.mkdir()
    marker = tmp_path / "pwned"
    (dcp / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(checkpoint.CheckpointError, match="refused unloaded"):
        checkpoint.check_dcp(dcp)
    assert not marker.exists(), "the checkpoint ran code"


def test_missing_or_unexpected_model_keys_are_named(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from pipeline import checkpoint

    checkpoints_at(tmp_path, steps=(1,))
    path = tmp_path / "step-000001"
    state = load_file(path / "model.safetensors")
    state["2.weight"] = state.pop("1.weight")
    save_file(state, path / "model.safetensors")
    rewrite_checksums(path)
    accelerator, model, optimizer, scheduler = tiny_trainer(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(checkpoint.CheckpointError, match=r"missing keys 1\.weight; unexpected keys 2\.weight"):
        checkpoint.read(path, accelerator, model, "ddp")
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before), "a refused checkpoint was applied"


def test_a_checkpoint_of_another_layout_is_one_line_not_skipped(tmp_path):
    """train.parallel=fsdp on a DDP checkpoint: a ConfigError naming both (no fallback to an older one)."""
    from pipeline import checkpoint
    from pipeline.config import ConfigError

    checkpoints_at(tmp_path)
    accelerator, model, _, _ = tiny_trainer()
    with pytest.raises(ConfigError, match="train.parallel=ddp .* train.parallel=fsdp") as err:
        checkpoint.read_latest(tmp_path, accelerator, model, "fsdp")
    assert not isinstance(err.value, checkpoint.CheckpointError) and "\n" not in str(err.value)


def test_twelve_random_flips_of_model_safetensors_are_all_caught(tmp_path):
    """The review's trial: 12 single-byte flips (header and data) of the newest checkpoint's weights."""
    from pipeline import checkpoint

    checkpoints_at(tmp_path, steps=(1,))
    target = tmp_path / "step-000001" / "model.safetensors"
    intact = target.read_bytes()
    rng = np.random.default_rng(0)
    offsets = [*rng.integers(0, 64, 4), *rng.integers(64, len(intact), 8)]  # 4 in the JSON header
    for offset in offsets:
        flip_byte(target, int(offset))
        with pytest.raises(checkpoint.CheckpointError, match="model.safetensors does not match its checksum"):
            read_latest(tmp_path)
        target.write_bytes(intact)
    assert read_latest(tmp_path)[0].path.name == "step-000001"
