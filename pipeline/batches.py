"""Torch side of the stream: sources, collation into padded tensors, DataLoader workers.

A micro-batch is a dict of tensors:
    input_ids [B, L] (right-padded), attention_mask [B, L], valid [B, L] bool,
    labels [T] (next token, -1 at sequence ends), loss_mask [T], sample_ids [B],
    and the teacher's record for the T valid tokens in ``teacher`` (cache.schema.TeacherRecord, as
    tensors; None for prepared data without a teacher).
Valid tokens are flattened sequence by sequence, the order of ``hidden[valid]``.
``host_view`` adds, right before the transfer, what the training step must not ask the device
for (token counts, row indices, sample ids): computed from the host copy, so no step waits on
the GPU for them (docs/training.md, "Host syncs").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cache.schema import Sequences, TeacherRecord
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

    def prefetch(self, shards: list[int]) -> None:
        """Nothing to read ahead: the split is one memory-mapped Arrow table."""

    def read_many(self, shard: int, locals_: np.ndarray) -> Sequences:
        rows = self.ds[[int(i) for i in locals_]]
        ids = [np.asarray(x) for x in rows["input_ids"]]
        return Sequences(sample_ids=np.asarray(rows["sample_id"], np.int64), seq_lens=np.array([len(x) for x in ids]),
                         input_ids=np.concatenate(ids), loss_mask=np.concatenate([np.asarray(m) for m in rows["loss_mask"]]))


# None: as stored (expert ids stay uint8/int16 to the device; pipeline/router.py widens them where they index)
TENSOR_DTYPES = {"topk_ids": np.int64, "draw_ids": np.int64, "draw_counts": np.int32, "router_ids": None}


def to_tensors(teacher: TeacherRecord) -> TeacherRecord:
    """The record's arrays as CPU tensors: vocabulary ids int64 (what gather takes), values float32, expert
    ids as stored."""
    return replace(teacher, **{k: torch.from_numpy(np.asarray(v, TENSOR_DTYPES.get(k, np.float32)))
                               for k, v in teacher.arrays().items()})


def collate(seqs: Sequences, pad_id: int = 0) -> dict:
    lengths = np.asarray(seqs.seq_lens)
    width = int(lengths.max())
    valid = np.arange(width)[None, :] < lengths[:, None]
    ids = np.full(valid.shape, pad_id, dtype=np.int64)
    ids[valid] = seqs.input_ids
    labels = np.full(valid.shape, -1, dtype=np.int64)
    labels[:, :-1] = np.where(valid[:, 1:], ids[:, 1:], -1)
    return {
        "input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(valid.astype(np.int64)),
        "valid": torch.from_numpy(valid), "labels": torch.from_numpy(labels[valid]),
        "loss_mask": torch.from_numpy(np.asarray(seqs.loss_mask, np.bool_)),
        "sample_ids": torch.from_numpy(np.asarray(seqs.sample_ids, np.int64)),
        "teacher": None if seqs.teacher is None else to_tensors(seqs.teacher),
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
    return {k: v if k == "host" or v is None else v.to(device, non_blocking=True) for k, v in batch.items()}


def host_view(mb: dict) -> dict:
    """The host micro-batch plus index tensors and plain Python data derived from it on the CPU.

    Tensors (moved to the device with the batch): ``valid_index`` [T] (flat positions of the
    valid tokens in [B·L], the order of ``hidden[valid]``), ``prompt_rows`` [R] (valid positions
    with a next token that are not trained on). Under ``host`` (never moved): the loss-masked and
    prompt token counts, sample ids and sequence lengths (which seed the MC draws). Index_select on
    these gives what boolean-mask indexing gives, without its device-to-host sync.
    """
    loss_mask, labels, valid = mb["loss_mask"].numpy(), mb["labels"].numpy(), mb["valid"].numpy()
    prompt_R = np.flatnonzero((labels >= 0) & ~loss_mask.astype(bool))
    host = {"loss_tokens": int(np.count_nonzero(loss_mask)), "prompt_tokens": len(prompt_R),
            "sample_ids": mb["sample_ids"].numpy().tolist(), "lengths": valid.sum(1).tolist()}
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


def loader(stream: ShardStream, micro, num_workers: int, pin_memory: bool = False):
    """Micro-batches in the order of ``micro`` (an iterable of sequence-index arrays), read ahead by
    ``num_workers`` processes (each opens its own shard handles) and pinned for asynchronous copies.
    A worker's micro-batch crosses as one shared buffer (``PackedBatch``).

    The workers' seeds come from a generator seeded by run.seed, not from torch's global RNG, so
    starting a loader (at the run's start or at a resume) leaves the training RNG untouched."""
    seeds = torch.Generator().manual_seed(stream.plan.seed)
    workers = dict(num_workers=num_workers, prefetch_factor=PREFETCH, collate_fn=PackedBatch.of) if num_workers else {}
    data = DataLoader(MicroBatches(stream), sampler=micro, batch_size=None, pin_memory=pin_memory, generator=seeds,
                      **workers)
    return map(PackedBatch.unpack, data) if num_workers else data


PREFETCH = 4  # micro-batches each worker reads ahead
ALIGN = 64  # bytes: every tensor of a packed micro-batch starts on a cache line


@dataclass
class PackedBatch:
    """A micro-batch as ONE byte buffer and where each tensor lies in it, for the trip from a DataLoader
    worker. torch shares every tensor's storage on its own, each a file-descriptor round trip to the
    worker that the worker answers only between its own decoding: with the ~15 tensors of a KD
    micro-batch that cost the step ~41 ms of waiting on 2 cores, with a core free for the worker
    (docs/training.md, "Data stream"). One buffer is one round trip, and one pinned copy on GPU."""

    buffer: torch.Tensor  # uint8
    layout: list  # (name, dtype, shape, byte offset); teacher fields as "teacher.<field>"
    teacher: TeacherRecord | None  # the record's metadata, its arrays None

    @classmethod
    def of(cls, batch: dict) -> "PackedBatch":
        teacher = batch["teacher"]
        tensors = {k: v for k, v in batch.items() if k != "teacher"}
        tensors |= {f"teacher.{k}": v for k, v in (teacher.arrays() if teacher is not None else {}).items()}
        layout, size = [], 0
        for name, t in tensors.items():
            layout.append((name, t.dtype, tuple(t.shape), size))
            size += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        buffer = torch.empty(size, dtype=torch.uint8)
        packed = cls(buffer, layout, None if teacher is None else teacher.map(lambda _: None))
        for (name, *_), view in zip(layout, packed.views()):
            view.copy_(tensors[name])
        return packed

    def views(self) -> list[torch.Tensor]:
        return [self.buffer[o:o + int(np.prod(shape)) * dtype.itemsize].view(dtype).view(shape)
                for _, dtype, shape, o in self.layout]

    def unpack(self) -> dict:
        """The micro-batch, its tensors views of the buffer."""
        tensors = {name: view for (name, *_), view in zip(self.layout, self.views())}
        fields = {k.removeprefix("teacher."): v for k, v in tensors.items() if k.startswith("teacher.")}
        teacher = None if self.teacher is None else replace(self.teacher, **fields)
        return {k: v for k, v in tensors.items() if not k.startswith("teacher.")} | {"teacher": teacher}

    def pin_memory(self) -> "PackedBatch":  # the DataLoader's pinning thread calls this
        return replace(self, buffer=self.buffer.pin_memory())


def train_batches(stream: ShardStream, num_workers: int = 0, pin_memory: bool = False):
    """Yield (epoch, global step sequences, this rank's micro-batches) from the stream's position
    on, across epochs, through ONE DataLoader: its workers live for the whole run (persistent).

    The caller calls ``stream.next_epoch()`` when the epoch changes and ``stream.advance(step)``
    after the optimizer step, so a checkpoint records the position; prefetching never moves it.
    """
    if stream.growing(stream.epoch):
        yield from follow_batches(stream, num_workers, pin_memory)
    micro = ((epoch, mb) for epoch, step in planned_steps(stream) for mb in stream.rank_micro_batches(step))
    it = iter(loader(stream, micro, num_workers, pin_memory))
    per_step = stream.plan.micro_batches
    for epoch, step in planned_steps(stream):
        yield epoch, step, [next(it) for _ in range(per_step)]


def follow_batches(stream: ShardStream, num_workers: int = 0, pin_memory: bool = False):
    """Follow mode's epoch 0 while the cache grows (train.follow): the steps its settled shards complete,
    then the shards settled since, waiting for the cache stage when none did, until its manifest.

    Each such generation gets its own loader, so workers fork with the grown index. Growing is
    collective (rank 0 lists, every rank receives the same shards), at the same points on every rank."""
    position, per_step = stream.position, stream.plan.micro_batches
    while True:
        steps = stream.steps(0, position)
        if steps:
            report_follow(stream, len(steps))
            micro = [(0, mb) for step in steps for mb in stream.rank_micro_batches(step)]
            it = iter(loader(stream, micro, num_workers, pin_memory))
            for step in steps:
                yield 0, step, [next(it) for _ in range(per_step)]
                position += len(step)
            stream.grow(wait=False)
        elif stream.source.complete:
            return
        else:
            stream.grow(wait=True)


def report_follow(stream: ShardStream, steps: int) -> None:
    follower = stream.source.follower
    if follower.is_main:
        state = "complete" if follower.complete else "still growing"
        print(f"follow: {len(follower.shards)} shards ({len(stream):,} sequences) committed, the cache is {state}; "
              f"{steps} more steps planned", flush=True)


def epoch_steps(stream: ShardStream, num_workers: int = 0):
    """Yield (global step sequences, this rank's micro-batches) of the current epoch from the
    stream's position on (the caller advances the stream as in ``train_batches``)."""
    steps = stream.steps(stream.epoch, stream.position)
    micro = [(stream.epoch, mb) for step in steps for mb in stream.rank_micro_batches(step)]
    it = iter(loader(stream, micro, num_workers))
    for step in steps:
        yield step, [next(it) for _ in range(stream.plan.micro_batches)]
