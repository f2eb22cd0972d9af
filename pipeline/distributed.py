"""Rank, world size, device and barriers for multi-process stages (torchrun / accelerate).

A thin layer over accelerate's PartialState: gloo on CPU, NCCL on GPUs, one process
when no launcher set the environment. The train stage's Accelerator is built here too:
DDP or FSDP2 as train.parallel says (docs/training.md, docs/multinode.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from pipeline.config import ConfigError


def use_cpu(device: str) -> bool:
    """run.device: 'cpu', 'cuda', or 'auto' (CUDA when available); 'cuda' without one is one line."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is visible; use run.device=auto or run.device=cpu")
    return device == "cpu" or not torch.cuda.is_available()


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device
    _state: object = None

    @classmethod
    def from_env(cls, cpu: bool | None = None, timeout_s: float | None = None) -> "Dist":
        """``timeout_s``: how long a collective (a barrier) waits for the other ranks; it applies
        when this call creates the process group (the first in a process), else torch's default."""
        from accelerate import PartialState  # lazy: ~2 s of import beyond torch; use_cpu alone needs none of it

        cpu = not torch.cuda.is_available() if cpu is None else cpu
        st = PartialState(cpu=cpu, **({"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}))
        return cls(rank=st.process_index, world_size=st.num_processes, device=st.device, _state=st)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            self._state.wait_for_everyone()


# --- the train stage's accelerator: DDP or FSDP2, chosen by train.parallel ---------------------

PARALLEL = ("ddp", "fsdp")
LAUNCHER_MODES = {"ACCELERATE_USE_FSDP": "fsdp", "ACCELERATE_USE_DEEPSPEED": "deepspeed",
                  "ACCELERATE_USE_MEGATRON_LM": "megatron_lm"}  # what `accelerate launch --config_file` sets


def check_launcher(parallel: str) -> None:
    """train.parallel decides DDP or FSDP; a launcher config asking for another mode is one line, not obeyed."""
    for env, mode in LAUNCHER_MODES.items():
        if os.environ.get(env, "false").lower() == "true" and mode != parallel:
            supported = "train.parallel=fsdp" if mode == "fsdp" else "train.parallel=fsdp (DeepSpeed and Megatron are not supported)"
            raise ConfigError(f"the launcher's accelerate config asks for {mode} ({env}=true) but train.parallel="
                              f"{parallel}: kdcache takes the mode from its own config; set {supported}, or "
                              f"launch without that accelerate config")


def fsdp_plugin(mixed_precision: str):
    """FSDP2, each transformer block its own shard group (named at prepare), sharded DCP checkpoints.
    Under bf16 the gradients are reduced in fp32, as DDP reduces its fp32 gradients. Every field
    the plugin would otherwise read from a launcher's FSDP_* environment is set here (offload and
    activation checkpointing too: student.gradient_checkpointing is kdcache's knob)."""
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else None
    return FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
                                          state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False,
                                          mixed_precision_policy=policy, cpu_offload=False,
                                          activation_checkpointing=False)


def training_accelerator(parallel: str, cpu: bool, mixed_precision: str, tracker: str | None, project_dir: str):
    """The Accelerator of the train stage: DDP (one process: none) or FSDP2 over every process."""
    from accelerate import Accelerator, PartialState

    check_launcher(parallel)
    world = PartialState(cpu=cpu).num_processes
    if parallel == "fsdp" and world < 2:
        raise ConfigError("train.parallel=fsdp shards the student over processes but this run has one; launch with "
                          "torchrun --nproc_per_node N (N >= 2), or use train.parallel=ddp")
    plugin = fsdp_plugin(mixed_precision) if parallel == "fsdp" else None
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with=tracker, project_dir=project_dir,
                              fsdp_plugin=plugin)
    if plugin is not None and not accelerator.is_fsdp2:
        enable_fsdp_on_cpu(accelerator, plugin)
    return accelerator


def enable_fsdp_on_cpu(accelerator, plugin) -> None:
    """accelerate 1.15 turns FSDP on for GPU-family process groups only (state.py leaves MULTI_CPU out),
    though what it runs for FSDP2 (fully_shard, DCP save/load, DTensor-aware clipping) is
    device-agnostic and works over gloo. On CPU we set the type it sets on GPUs, in both of its
    shared states (an AcceleratorState built later copies PartialState's), so CPU runs and tests
    take the very code path a GPU run takes."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    assert accelerator.is_fsdp2


def prepare(accelerator, model, optimizer, scheduler):
    """Wrap model and optimizer (DDP or FSDP2) and register the scheduler for save_state/load_state.

    The scheduler is registered, not prepared: accelerate's scheduler wrapper steps it once per
    process, and ours counts optimizer steps. Under FSDP each block of the student's own
    ``_no_split_modules`` (its decoder layer) is a shard group; the rest (embeddings, final norm,
    lm_head, the wrapper's router temperature) is the root group."""
    if accelerator.is_fsdp2:
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = list(model.model._no_split_modules or [])
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    return model, optimizer
