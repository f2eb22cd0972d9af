"""Torch side of the stream: sources, collation into padded tensors, DataLoader workers.

A micro-batch is a dict of tensors:
    input_ids [B, L] (right-padded), attention_mask [B, L], valid [B, L] bool,
    labels [T] (next token, -1 at sequence ends), loss_mask [T], sample_ids [B],
    and the teacher's signal for the T valid tokens in ``teacher`` (see TeacherTargets):
    topk_ids [T, K], topk_logprobs [T, K], log_partition [T, P],
    draw_ids / draw_weights [T, D] (padded), router_ids / router_probs [T, L_moe, R].
Valid tokens are flattened sequence by sequence, the order of ``hidden[valid]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cache.schema import TeacherOutput
from cache.stream import SequenceIndex, ShardStream


class PreparedSource:
    """Sequences of a prepared split without a teacher (SFT, CE-only baselines)."""

    def __init__(self, run_dir: Path, split: str = "train"):
        from stages.prepare import load_split

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
    def __init__(self, stream: ShardStream, micro: list[np.ndarray]):
        self.stream, self.micro = stream, micro

    def __len__(self) -> int:
        return len(self.micro)

    def __getitem__(self, i: int) -> dict:
        return collate(self.stream.load(self.micro[i]))


def epoch_steps(stream: ShardStream, num_workers: int = 0):
    """Yield (global step sequences, this rank's micro-batches) from the stream's position on.

    Micro-batches are loaded by DataLoader workers in order; the caller calls
    ``stream.advance(step)`` after the optimizer step so a checkpoint records it.
    """
    steps = stream.steps(stream.epoch, stream.position)
    micro = [mb for step in steps for mb in stream.rank_micro_batches(step)]
    loader = DataLoader(MicroBatches(stream, micro), batch_size=None, num_workers=num_workers,
                        persistent_workers=False, prefetch_factor=4 if num_workers else None)
    it = iter(loader)
    per_step = stream.plan.micro_batches
    for step in steps:
        yield step, [next(it) for _ in range(per_step)]
