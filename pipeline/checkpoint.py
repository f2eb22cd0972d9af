"""Trainer checkpoints: accelerate's save_state under a temporary name, checksummed, renamed when complete.

``train/checkpoints/step-000120/`` holds what ``Accelerator.save_state`` writes, plus ours:
    model.safetensors          DDP / one process: the student's state dict (unwrapped keys, any rank count)
    pytorch_model_fsdp_0/      FSDP: the model's DCP shards (``__R_0.distcp`` per rank, ``.metadata``)
    optimizer.bin              DDP: the optimizer state (replicated, so rank 0 writes it)
    optimizer_0/               FSDP: the optimizer state, each rank its shard (DCP)
    custom_checkpoint_0.pkl    the learning-rate schedule
    random_states_R.pkl        rank R's RNG states (python, numpy, torch, cuda): each rank its own
    progress.json              step, stream position, world size, train.parallel
    COMPLETE                   sha256 of every file above (paths relative to the directory), written last
A directory counts only once it was renamed from its temporary name and holds ``COMPLETE``.

``read`` checks everything before anything is applied, so resume can skip a damaged checkpoint
and take the previous one: the checksums, the model's key set, and that every pickle holds only
tensors and plain data (``.bin``/``.pkl`` through accelerate's own weights-only loader; DCP's
``.metadata`` through an unpickler that admits its metadata classes only, and its non-tensor
items with ``weights_only=True``), since DCP itself unpickles both freely. ``apply`` is
``Accelerator.load_state``: a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pipeline.config import ConfigError

COMPLETE = "COMPLETE"
PROGRESS = "progress.json"
MODEL = "model.safetensors"  # accelerate's SAFE_WEIGHTS_NAME
FSDP_MODEL = "pytorch_model_fsdp_0"  # accelerate's FSDP_MODEL_NAME, model 0


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from (damaged, foreign, or not kdcache's)."""


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- save ------------------------------------------------------------------------------------


def attach(accelerator) -> None:
    """Make save_state/load_state write and read the unwrapped student's keys outside FSDP, so a
    checkpoint of N DDP ranks resumes on M (DDP prefixes ``module.``; one process does not)."""
    def save_unwrapped(models, weights, output_dir) -> None:
        if weights:  # empty under FSDP: DCP writes the model
            weights[:] = [accelerator.unwrap_model(m).state_dict() for m in models]

    def load_unwrapped(models, input_dir) -> None:
        from safetensors.torch import load_file

        for m in models:
            unwrapped = accelerator.unwrap_model(m)
            result = unwrapped.load_state_dict(load_file(Path(input_dir) / MODEL), strict=False)
            assert not result.unexpected_keys and set(result.missing_keys) <= aliased(unwrapped), result
        models.clear()  # loaded here, not by accelerate (which would expect DDP's prefixed keys)

    accelerator.register_save_state_pre_hook(save_unwrapped)
    accelerator.register_load_state_pre_hook(load_unwrapped)


def save(accelerator, ckpt_root: Path, step: int, stream_state: dict, keep: int, parallel: str) -> Path:
    """Every rank calls this: save_state (each rank its RNG and, under FSDP, its shards), then the
    checksums (each rank hashes a share of the files), then rank 0 writes COMPLETE last, renames the
    directory into place and prunes old ones. Checkpoints need a filesystem every rank sees."""
    final, tmp = ckpt_root / f"step-{step:06d}", ckpt_root / f".step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / PROGRESS).write_text(json.dumps({"step": step, "stream": stream_state, "parallel": parallel,
                                                "world_size": accelerator.num_processes}))
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    sums = file_sums(tmp, accelerator)
    if accelerator.is_main_process:
        (tmp / COMPLETE).write_text(json.dumps(sums, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def file_sums(directory: Path, accelerator) -> dict[str, str]:
    """{relative path: sha256} of every file under ``directory``, the hashing shared among the ranks."""
    from accelerate.utils import gather_object

    names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    mine = [(name, sha256(directory / name)) for name in names[accelerator.process_index::accelerator.num_processes]]
    return dict(sorted(gather_object(mine) if accelerator.num_processes > 1 else mine))


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.exists():
        return []
    found = [p for p in ckpt_root.glob("step-*") if (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest(ckpt_root: Path) -> Path | None:
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


# --- read (check everything) and apply -------------------------------------------------------


@dataclass
class Loaded:
    """A checkpoint read and checked, nothing applied yet."""

    path: Path
    progress: dict


def verify(path: Path) -> dict[str, str]:
    """CheckpointError unless every file COMPLETE lists is present with the recorded sha256."""
    try:
        sums = json.loads((path / COMPLETE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        sums = None
    if isinstance(sums, dict) and "trainer.pt" in sums:
        raise CheckpointError(f"{path} was written by an older kdcache (before accelerate's save_state)")
    if not isinstance(sums, dict) or PROGRESS not in sums or not ({MODEL, f"{FSDP_MODEL}/.metadata"} & set(sums)):
        raise CheckpointError(f"{path / COMPLETE} records no checksums (damaged, or written by an older kdcache)")
    for name, want in sorted(sums.items()):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing")
        if sha256(path / name) != want:
            raise CheckpointError(f"{path / name} does not match its checksum (its bytes changed after it was written)")
    return sums


def check_layout(path: Path, progress: dict, parallel: str, world_size: int) -> None:
    """A checkpoint's layout must be this run's: DDP resumes on any rank count, FSDP on any count >= 2
    (DCP reshards), never one as the other. Not a damage: raised as a ConfigError, not skipped."""
    saved = progress.get("parallel", "ddp")
    if saved != parallel:
        raise ConfigError(f"{path} was written with train.parallel={saved} ({progress.get('world_size', 1)} "
                          f"processes) but this run has train.parallel={parallel}; resume with "
                          f"train.parallel={saved}, or delete {path.parent} to train from the start")
    assert parallel != "fsdp" or world_size >= 2, "training_accelerator refuses FSDP on one process"


def read(path: Path, accelerator, model, parallel: str) -> Loaded:
    """Check a checkpoint for ``model`` (the unwrapped student): checksums, layout, key set, pickles."""
    sums = verify(path)
    progress = json.loads((path / PROGRESS).read_text())
    check_layout(path, progress, parallel, accelerator.num_processes)
    saved = fsdp_keys(path / FSDP_MODEL) if parallel == "fsdp" else safetensors_keys(path / MODEL)
    check_keys(path, saved, aliased(model) if parallel == "ddp" else set(), set(model.state_dict()))
    for name in sums:
        if name.endswith((".bin", ".pkl")):
            check_plain(path / name)
        elif name.endswith("/.metadata"):
            check_dcp(path / Path(name).parent)
    return Loaded(path, progress)


def safetensors_keys(path: Path) -> set[str]:
    try:
        with safe_open(path, "pt") as f:
            return set(f.keys())
    except SafetensorError as err:
        raise CheckpointError(f"{path} cannot be read ({err})") from None


def fsdp_keys(dcp_dir: Path) -> set[str]:
    """The model's keys in a DCP directory (accelerate saves them under ``model.``)."""
    return {k.removeprefix("model.") for k in dcp_metadata(dcp_dir).state_dict_metadata}


def aliased(model) -> set[str]:
    """Keys that share storage with an earlier one (tied embeddings): safetensors keeps one of each."""
    seen, out = set(), set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            out.add(name)
        seen.add(key)
    return out


def check_keys(path: Path, saved: set[str], may_miss: set[str], expected: set[str]) -> None:
    missing, unexpected = sorted(expected - saved - may_miss), sorted(saved - expected)
    if missing or unexpected:
        parts = [f"missing keys {', '.join(missing[:5])}" if missing else "",
                 f"unexpected keys {', '.join(unexpected[:5])}" if unexpected else ""]
        raise CheckpointError(f"{path} does not fit this student ({'; '.join(p for p in parts if p)}): another "
                              f"student.path or model settings?")


def refused(path: Path, err: Exception) -> CheckpointError:
    reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return CheckpointError(f"{path} holds something other than tensors and plain data, refused unloaded ({reason})")


def check_plain(path: Path) -> None:
    """The file loads with accelerate's own loader (weights_only, its numpy allowlist), as load_state will."""
    from accelerate.utils import load

    try:
        load(path, map_location="cpu", mmap=True)  # mmap: the check reads no tensor data
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise refused(path, err) from None


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata admits the classes of its metadata, torch's Size and dtypes, nothing that runs code."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}

    def find_class(self, module: str, name: str):
        found = super().find_class(module, name) if module in self.MODULES + ("torch", "torch.serialization", "pathlib") else None
        if (module, name) in self.NAMES or isinstance(found, torch.dtype) or (module in self.MODULES and isinstance(found, type)):
            return found
        raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")


def dcp_metadata(dcp_dir: Path):
    try:
        with open(dcp_dir / ".metadata", "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as err:
        raise refused(dcp_dir / ".metadata", err) from None


def check_dcp(dcp_dir: Path) -> None:
    """DCP unpickles non-tensor items (optimizer steps, param groups) with weights_only=False; check
    each one loads with weights_only=True first."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = dcp_metadata(dcp_dir)
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        with open(dcp_dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            raise refused(dcp_dir / info.relative_path, err) from None


def apply(loaded: Loaded, accelerator) -> dict:
    """Restore model, optimizer, schedule and each rank's own RNG (load_state); return the progress."""
    accelerator.load_state(str(loaded.path))
    return loaded.progress


def read_latest(ckpt_root: Path, accelerator, model, parallel: str, warn=print) -> Loaded | None:
    """The newest complete checkpoint that passes ``read``; each one skipped is named in one ``warn`` line.

    None when there is no complete checkpoint; a CheckpointError when there are some and none is usable.
    """
    found = complete_checkpoints(ckpt_root)
    for i, path in enumerate(reversed(found)):
        try:
            return read(path, accelerator, model, parallel)
        except CheckpointError as err:
            rest = len(found) - 1 - i
            if not rest:
                raise CheckpointError(f"no usable checkpoint in {ckpt_root} ({len(found)} tried, the oldest: "
                                      f"{err}); delete {ckpt_root} to train from the start") from None
            warn(f"warning: skipping checkpoint {path.name}: {err}; trying the previous complete one")
    return None
