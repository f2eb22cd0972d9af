"""Torch side of the stream: sources, collation into padded tensors, DataLoader workers.

A micro-batch is a dict of tensors:
    input_ids [B, L] (right-padded), attention_mask [B, L], valid [B, L] bool,
    labels [T] (next token, -1 at sequence ends), loss_mask [T], sample_ids [B],
    and the teacher's signal for the T valid tokens in ``teacher`` (see TeacherTargets):
    topk_ids [T, K], topk_logprobs [T, K], log_partition [T, P],
    draw_ids / draw_weights [T, D] (padded), router_ids / router_probs [T, L_moe, R].
Valid tokens are flattened sequence by sequence, the order of ``hidden[valid]``.
``host_view`` adds, right before the transfer, what the training step must not ask the device
for (token counts, row indices, sample ids): computed from the host copy, so no step waits on
the GPU for them (docs/training.md, "Host syncs").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cache.schema import TeacherOutput
from cache.stream import SequenceIndex, ShardStream
from pipeline.splits import load_split


class PreparedSource:
    """Sequences of a prepared split without a teacher (SFT, CE-only baselines)."""

    def __init__(self, run_dir: Path, split: str = "train"):
        self.ds, _ = load_split(run_dir, split)

    def index(self) -> SequenceIndex:
        import pyarrow.compute as pc

        table = self.ds.data  # arrow: lengths without decoding every row
        lengths = pc.list_value_length(table.column("input_ids")).to_numpy().astype(np.int64)
        sample_ids = table.column("sample_id").to_numpy()
        n = len(lengths)
        return SequenceIndex(sample_ids, lengths, np.zeros(n, dtype=np.int64), np.arange(n))

    def read(self, shard: int, local: int) -> TeacherOutput:
        row = self.ds[int(local)]
        return TeacherOutput(sample_ids=np.array([row["sample_id"]]), seq_lens=np.array([len(row["input_ids"])]),
                             input_ids=np.asarray(row["input_ids"]), loss_mask=np.asarray(row["loss_mask"]),
                             target_logprob=None, log_partition=None)


def _pad_draws(out: TeacherOutput) -> tuple[torch.Tensor, torch.Tensor]:
    n_T = np.asarray(out.draw_n)
    width = max(int(n_T.max()) if len(n_T) else 0, 1)
    rows = np.repeat(np.arange(len(n_T)), n_T)
    cols = np.arange(len(rows)) - np.repeat(np.cumsum(n_T) - n_T, n_T)
    ids, weights = np.zeros((len(n_T), width), np.int64), np.zeros((len(n_T), width), np.float32)
    ids[rows, cols] = out.draw_ids
    counts = np.asarray(out.draw_counts, np.float32)
    total = np.bincount(rows, weights=counts, minlength=len(n_T))
    weights[rows, cols] = counts / np.maximum(total[rows], 1)
    return torch.from_numpy(ids), torch.from_numpy(weights)


def teacher_tensors(out: TeacherOutput) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    if out.log_partition is not None:
        t["log_partition"] = torch.from_numpy(np.asarray(out.log_partition, np.float32))
    if out.target_logprob is not None:
        t["target_logprob"] = torch.from_numpy(np.asarray(out.target_logprob, np.float32))
    if out.topk_ids is not None:
        t["topk_ids"] = torch.from_numpy(np.asarray(out.topk_ids, np.int64))
        t["topk_logprobs"] = torch.from_numpy(np.asarray(out.topk_logprobs, np.float32))
    if out.draw_n is not None:
        t["draw_ids"], t["draw_weights"] = _pad_draws(out)
    if out.router_ids is not None:
        t["router_ids"] = torch.from_numpy(np.asarray(out.router_ids, np.int64))
        if out.router_probs is not None:
            t["router_probs"] = torch.from_numpy(np.asarray(out.router_probs, np.float32))
    return t


def collate(out: TeacherOutput, pad_id: int = 0) -> dict:
    lengths = np.asarray(out.seq_lens)
    width = int(lengths.max())
    valid = np.arange(width)[None, :] < lengths[:, None]
    ids = np.full(valid.shape, pad_id, dtype=np.int64)
    ids[valid] = out.input_ids
    labels = np.full(valid.shape, -1, dtype=np.int64)
    labels[:, :-1] = np.where(valid[:, 1:], ids[:, 1:], -1)
    return {
        "input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(valid.astype(np.int64)),
        "valid": torch.from_numpy(valid), "labels": torch.from_numpy(labels[valid]),
        "loss_mask": torch.from_numpy(np.asarray(out.loss_mask, np.bool_)),
        "sample_ids": torch.from_numpy(np.asarray(out.sample_ids, np.int64)), "teacher": teacher_tensors(out),
    }


class MicroBatches(Dataset):
    """A micro-batch is named by its epoch and sequence indices (what the sampler yields), so one loader
    serves every epoch; the epoch tells the stream which shards to read ahead."""

    def __init__(self, stream: ShardStream):
        self.stream = stream

    def __getitem__(self, item: tuple[int, np.ndarray]) -> dict:
        epoch, seqs = item
        return collate(self.stream.load(seqs, epoch))


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to the device (asynchronously from pinned memory); the plain Python ``host`` data stays."""
    return {k: v if k == "host" else to_device(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True)
            for k, v in batch.items()}


def host_view(mb: dict, step: int = 0, log_stats: bool = True) -> dict:
    """The host micro-batch plus index tensors and plain Python data derived from it on the CPU.

    Tensors (moved to the device with the batch): ``valid_index`` [T] (flat positions of the
    valid tokens in [B·L], the order of ``hidden[valid]``), ``prompt_rows`` [R] (valid positions
    with a next token that are not trained on). Under ``host`` (never moved): the loss-masked and
    prompt token counts, sample ids, sequence lengths, the step (seeds the MC draws) and whether
    this step computes load statistics. Index_select on these gives what boolean-mask indexing
    gives, without its device-to-host sync.
    """
    loss_mask, labels, valid = mb["loss_mask"].numpy(), mb["labels"].numpy(), mb["valid"].numpy()
    prompt_R = np.flatnonzero((labels >= 0) & ~loss_mask.astype(bool))
    host = {"loss_tokens": int(np.count_nonzero(loss_mask)), "prompt_tokens": len(prompt_R),
            "sample_ids": mb["sample_ids"].numpy().tolist(), "lengths": valid.sum(1).tolist(),
            "step": int(step), "log_stats": bool(log_stats)}
    return {**mb, "valid_index": torch.from_numpy(np.flatnonzero(valid)), "prompt_rows": torch.from_numpy(prompt_R),
            "host": host}


def valid_rows(batch: dict) -> torch.Tensor:
    """Int64 [T]: flat positions of the valid tokens in [B·L], the rows of ``x_BL[valid]``: from
    the host (``host_view``) when the batch carries them, else by nonzero (which waits for the device)."""
    if "valid_index" in batch:
        return batch["valid_index"]
    return batch["valid"].reshape(-1).nonzero()[:, 0]


def planned_steps(stream: ShardStream):
    """(epoch, global step sequences) from the stream's position on, epoch after epoch; stops at
    an epoch with no step (data smaller than one step). A pure function of the plan: the sampler
    and the training loop each walk their own copy."""
    epoch, start = stream.epoch, stream.position
    while True:
        steps = stream.steps(epoch, start)
        if not steps and start == 0:
            return
        for step in steps:
            yield epoch, step
        epoch, start = epoch + 1, 0


def loader(stream: ShardStream, micro, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Micro-batches in the order of ``micro`` (an iterable of sequence-index arrays), read ahead by
    ``num_workers`` processes (each opens its own shard handles) and pinned for asynchronous copies.

    The workers' seeds come from a generator seeded by run.seed, not from torch's global RNG, so
    starting a loader (at the run's start or at a resume) leaves the training RNG untouched."""
    seeds = torch.Generator().manual_seed(stream.plan.seed)
    return DataLoader(MicroBatches(stream), sampler=micro, batch_size=None, num_workers=num_workers,
                      pin_memory=pin_memory, prefetch_factor=PREFETCH if num_workers else None, generator=seeds)


PREFETCH = 4  # micro-batches each worker reads ahead


def train_batches(stream: ShardStream, num_workers: int = 0, pin_memory: bool = False):
    """Yield (epoch, global step sequences, this rank's micro-batches) from the stream's position
    on, across epochs, through ONE DataLoader: its workers live for the whole run (persistent).

    The caller calls ``stream.next_epoch()`` when the epoch changes and ``stream.advance(step)``
    after the optimizer step, so a checkpoint records the position; prefetching never moves it.
    """
    micro = ((epoch, mb) for epoch, step in planned_steps(stream) for mb in stream.rank_micro_batches(step))
    it = iter(loader(stream, micro, num_workers, pin_memory))
    per_step = stream.plan.micro_batches
    for epoch, step in planned_steps(stream):
        yield epoch, step, [next(it) for _ in range(per_step)]


def epoch_steps(stream: ShardStream, num_workers: int = 0):
    """Yield (global step sequences, this rank's micro-batches) of the current epoch from the
    stream's position on (the caller advances the stream as in ``train_batches``)."""
    steps = stream.steps(stream.epoch, stream.position)
    micro = [(stream.epoch, mb) for step in steps for mb in stream.rank_micro_batches(step)]
    it = iter(loader(stream, micro, num_workers))
    for step in steps:
        yield step, [next(it) for _ in range(stream.plan.micro_batches)]
