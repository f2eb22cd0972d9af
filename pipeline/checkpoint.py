"""Trainer checkpoints: written under a temporary name, checksummed, renamed when complete.

``train/checkpoints/step-000120/`` holds
    model.safetensors       the wrapped student's state dict
    trainer.pt              optimizer and scheduler state: tensors and plain data only
    rng-rank000.pt ...      each rank's RNG states (python, numpy, torch, cuda), tensors and plain data
    progress.json           step, stream position, world size
    COMPLETE                sha256 of every file above (JSON), written last
A directory counts only once it was renamed from its temporary name and holds ``COMPLETE``.
Every ``.pt`` loads with ``torch.load(weights_only=True)``: a checkpoint cannot run code, and one
that holds anything but tensors and plain data is refused, never unpickled. ``read`` checks the
checksums and the model's key set before anything is applied, so resume can skip a damaged
checkpoint and take the previous one (stages/train_student.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.config import ConfigError

COMPLETE = "COMPLETE"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from (damaged, foreign, or not kdcache's)."""


def rng_state() -> dict:
    """This process's RNG states as tensors and plain data (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_name(rank: int) -> str:
    return f"rng-rank{rank:03d}.pt"


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save(ckpt_root: Path, step: int, model, optimizer, scheduler, stream_state: dict, keep: int,
         rank: int = 0, world_size: int = 1, barrier=lambda: None) -> Path:
    """Every rank calls this: each writes its own RNG, then rank 0 writes the rest, the checksums last,
    renames the directory into place and prunes old ones."""
    final, tmp = ckpt_root / f"step-{step:06d}", ckpt_root / f".step-{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / rng_name(rank))
    barrier()
    if rank == 0:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "trainer.pt")
        (tmp / "progress.json").write_text(json.dumps({"step": step, "stream": stream_state, "world_size": world_size}))
        sums = {p.name: sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / COMPLETE).write_text(json.dumps(sums, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.exists():
        return []
    found = [p for p in ckpt_root.glob("step-*") if (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest(ckpt_root: Path) -> Path | None:
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


@dataclass
class Loaded:
    """A checkpoint read and checked, nothing applied yet."""

    path: Path
    model: dict
    trainer: dict
    rng: dict | None  # None: this rank had no RNG saved (the run had fewer ranks)
    progress: dict


def verify(path: Path) -> None:
    """CheckpointError unless every file COMPLETE lists is present with the recorded sha256."""
    try:
        sums = json.loads((path / COMPLETE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path / COMPLETE} records no checksums (damaged, or written by an older kdcache)") from None
    if not isinstance(sums, dict) or not {"model.safetensors", "trainer.pt", "progress.json"} <= set(sums):
        raise CheckpointError(f"{path / COMPLETE} records no checksums (damaged, or written by an older kdcache)")
    for name, want in sorted(sums.items()):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing")
        if sha256(path / name) != want:
            raise CheckpointError(f"{path / name} does not match its checksum (its bytes changed after it was written)")


def load_plain(path: Path) -> dict:
    """torch.load with weights_only=True: tensors and plain data, never an object that runs code."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} holds something other than tensors and plain data, refused "
                              f"unloaded ({reason})") from None


def read(path: Path, model, rank: int = 0) -> Loaded:
    """Check and read a checkpoint for ``model``: checksums, then the files, then the key set."""
    verify(path)
    try:
        state = load_file(path / "model.safetensors")
    except SafetensorError as err:
        raise CheckpointError(f"{path / 'model.safetensors'} cannot be read ({err})") from None
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        parts = [f"missing keys {', '.join(missing[:5])}" if missing else "",
                 f"unexpected keys {', '.join(unexpected[:5])}" if unexpected else ""]
        raise CheckpointError(f"{path / 'model.safetensors'} does not fit this student "
                              f"({'; '.join(p for p in parts if p)}): another student.path or model settings?")
    rng_file = path / rng_name(rank)
    return Loaded(path, state, load_plain(path / "trainer.pt"), load_plain(rng_file) if rng_file.exists() else None,
                  json.loads((path / "progress.json").read_text()))


def apply(loaded: Loaded, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; return the progress (step, stream)."""
    model.load_state_dict(loaded.model, strict=True)
    optimizer.load_state_dict(loaded.trainer["optimizer"])
    scheduler.load_state_dict(loaded.trainer["scheduler"])
    if loaded.rng is not None:
        set_rng_state(loaded.rng)
    return loaded.progress


def load(path: Path, model, optimizer, scheduler, rank: int = 0) -> dict:
    """read + apply: a CheckpointError (nothing changed) or the restored progress."""
    return apply(read(path, model, rank), model, optimizer, scheduler)


def read_latest(ckpt_root: Path, model, rank: int = 0, warn=print) -> Loaded | None:
    """The newest complete checkpoint that passes ``read``; each one skipped is named in one ``warn`` line.

    None when there is no complete checkpoint; a CheckpointError when there are some and none is usable.
    """
    found = complete_checkpoints(ckpt_root)
    for i, path in enumerate(reversed(found)):
        try:
            return read(path, model, rank)
        except CheckpointError as err:
            rest = len(found) - 1 - i
            if not rest:
                raise CheckpointError(f"no usable checkpoint in {ckpt_root} ({len(found)} tried, the oldest: "
                                      f"{err}); delete {ckpt_root} to train from the start") from None
            warn(f"warning: skipping checkpoint {path.name}: {err}; trying the previous complete one")
    return None
