"""The cache format: one source of truth for its version, fields and manifest.

A cache is a directory holding ``manifest.json`` plus shards (one Zarr group or one HDF5
file each). Arrays use a flat token axis: sequences are concatenated and ``seq_offsets``
marks their bounds. A shard that the manifest does not list does not exist. The manifest
records each shard's sha256 and a sha256 of its own content (``checksum``), so a damaged or
edited manifest is refused rather than half-read.

Shapes: T tokens in the shard, S sequences, K top-k entries, L MoE layers, R router
entries per layer (k_r), D stored draw entries, P cached temperatures.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cache.location import Location, atomic_file  # noqa: F401  (atomic_file lives where bytes go)

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
RECREATE = "re-create it with this kdcache: run_pipeline.py cache --force (sets the old cache aside)"


@dataclass(frozen=True)
class FieldSpec:
    name: str
    dtype: str  # the stored dtype, or the dtypes a codec may choose, separated by '|' (cache/codec.py)
    axis: str  # which flat axis dim 0 runs over: token | seq | seq+1 | draw
    meaning: str


# Stored arrays (v2). uint8/uint16 values are quantised log-probs (cache/codec.py: the codec's logprob_bits,
# 16 bits for the target's, router_bits for router probabilities); float32 where the preset is 'exact'.
QUANTISED = "uint8|uint16|float32"
FIELDS: dict[str, FieldSpec] = {
    f.name: f
    for f in [
        FieldSpec("input_ids", "int32", "token", "[T] tokens the teacher saw"),
        FieldSpec("loss_mask", "uint8", "token", "[T] 1 where the next-token target is trained on"),
        FieldSpec("seq_offsets", "int64", "seq+1", "[S+1] sequence bounds in the token axis"),
        FieldSpec("sample_ids", "int64", "seq", "[S] stable id of each sequence"),
        FieldSpec("target_logprob", "uint16|float32", "token", "[T] log-prob of the actual next token"),
        FieldSpec("log_partition", "float32", "token",
                  "[T, P-1] log sum p^(1/tau) at each cached tau != 1 (gauge log Z_1 = 0; absent when P = 1)"),
        FieldSpec("topk_ids", "int32", "token", "[T, K] top-k head: vocabulary ranks ascending, first then deltas"),
        FieldSpec("topk_logprobs", QUANTISED, "token", "[T, K] their log-probs at tau = 1, in the same order"),
        FieldSpec("draw_n", "uint8|uint16", "token", "[T] unique draws per position"),
        FieldSpec("seq_draw_offsets", "int64", "seq+1", "[S+1] sequence bounds in the draw axis"),
        FieldSpec("draw_ids", "int32", "draw", "[D] unique drawn ids: ranks ascending per position, first then deltas"),
        FieldSpec("draw_counts", "uint8|uint16", "draw", "[D] how often each id was drawn"),
        FieldSpec("draw_logprobs", QUANTISED, "draw", "[D] the teacher's log-prob (tau = 1) of each drawn id"),
        FieldSpec("router_ids", "uint8|int16", "token", "[T, L, R] top-k_r experts per stored layer: ascending deltas"),
        FieldSpec("router_probs", QUANTISED, "token", "[T, L, R] their router probabilities, in the same order"),
    ]
}


def chunk_rows(arrays: dict, chunk_tokens: int) -> dict[str, int]:
    """Rows per chunk of each stored array: ``chunk_tokens`` for the token arrays; a draw array's chunk spans
    about as many tokens (its mean entries per token × chunk_tokens), so a reader fetches as few chunk
    files for a shard's draws as for its head (at ~63 unique draws per token, 4,096-entry chunks made
    ~63x the files). Per-sequence arrays: as many rows as the token arrays (they are small)."""
    tokens = max(1, len(arrays.get("input_ids", ())))

    def rows(name: str, data) -> int:
        per_token = -(-len(data) // tokens) if FIELDS[name].axis == "draw" else 1
        return max(1, min(chunk_tokens * per_token, len(data)))

    return {name: rows(name, data) for name, data in arrays.items()}


class CacheError(ValueError):
    """A cache that cannot be used as asked (wrong version, other teacher, corrupt shard)."""


@dataclass
class ShardInfo:
    name: str
    rank: int
    n_tokens: int
    n_seqs: int
    nbytes: int
    checksum: str


@dataclass
class Manifest:
    """What a cache holds. ``identity`` must match for a resume or a reader to accept it."""

    identity: dict[str, Any]
    store: str
    fields: list[str]
    shards: list[ShardInfo] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    complete: bool = False

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def n_seqs(self) -> int:
        return sum(s.n_seqs for s in self.shards)

    @property
    def k(self) -> int:
        return int(self.identity.get("k", 0))

    def to_json(self) -> str:
        content = asdict(self)
        return json.dumps({**content, "checksum": content_checksum(content)}, indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheError(f"cache format version {version!r} is not supported (this kdcache reads version "
                             f"{FORMAT_VERSION} only); {RECREATE}")
        shards = [ShardInfo(**s) for s in data.get("shards", [])]
        return cls(**{**data, "shards": shards})


def content_checksum(content: dict) -> str:
    """sha256 of the canonical JSON of a manifest's content (everything but the checksum itself)."""
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_json_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that readers see either the old file or the whole new one."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_manifest(cache_dir, manifest: Manifest) -> None:
    """``cache_dir``: a path or a cache.location.Location; written whole (rename, or one PUT)."""
    Location.of(cache_dir).write_whole(MANIFEST_NAME, manifest.to_json().encode())


def read_manifest(cache_dir) -> Manifest:
    """The manifest of a cache (a path or a Location); a CacheError naming the file when it is missing,
    unreadable or altered."""
    location = Location.of(cache_dir)
    if not location.exists(MANIFEST_NAME):
        raise CacheError(f"{cache_dir} holds no {MANIFEST_NAME}: not a finished kdcache cache")
    path = location / MANIFEST_NAME
    damaged = (f"{path} is damaged ({{}}); re-create the cache: run_pipeline.py cache --force "
               f"(sets the old cache aside)")
    try:
        data = json.loads(location.read_bytes(MANIFEST_NAME).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(damaged.format(f"not valid JSON: {str(err).splitlines()[0]}")) from None
    if not isinstance(data, dict):
        raise CacheError(damaged.format("not a JSON object"))
    version = data.get("format_version")
    if isinstance(version, int) and version != FORMAT_VERSION:
        return Manifest.from_dict(data)  # a version this kdcache does not know: say that, not "damaged"
    recorded = data.pop("checksum", None)
    if recorded is None:
        raise CacheError(damaged.format("no checksum recorded: written by an older kdcache, or edited"))
    if recorded != content_checksum(data):
        raise CacheError(damaged.format("its content no longer matches its checksum"))
    unknown = sorted(set(data) - {f.name for f in dataclass_fields(Manifest)})
    if unknown:
        raise CacheError(damaged.format(f"unknown keys {', '.join(unknown)}"))
    try:
        return Manifest.from_dict(data)
    except TypeError as err:  # a shard record with other keys: only a hand-made manifest gets here
        raise CacheError(damaged.format(f"malformed: {err}")) from None


def identity_mismatch(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Names of the identity keys whose values differ (missing counts as different)."""
    keys = sorted(set(expected) | set(found))
    return [k for k in keys if expected.get(k) != found.get(k)]


METADATA = ("temperatures", "draw_temperature")  # the record's fields that are not per-token arrays


@dataclass
class TeacherRecord:
    """The teacher's signal for T tokens: the one record from a teacher backend (phase one) or the
    reader (phase two) to the loss. Its arrays are numpy in cache/ and the DataLoader workers and
    torch tensors in the trainer (``map``); optional parts are None when the cache lacks them.
    Draws are padded per token (unique ids, their counts, count 0 on padding); a shard stores them
    ragged (``draw_n`` per token), the reader pads them again. Decoded from a v2 cache: vocabulary ids
    int64, expert ids uint8 (int16 past 256 experts: 8x fewer bytes to the device, widened where they
    index), values float32, counts int32; log-probs at tau = 1 in the gauge log Z_1 = 0
    (``log_partition[:, 0]`` is 0, column j log sum_v p_v^(1/tau_j)); top-k entries by descending
    probability, router entries in no particular order (a backend's by descending probability, the
    reader's by ascending expert id); a token's draws in no particular order (ascending vocabulary
    rank), padding after them."""

    log_partition: Any  # [T, P] float: log sum exp(z / tau) per cached tau
    target_logprob: Any = None  # [T] float: log-prob of the actual next token
    temperatures: tuple[float, ...] = (1.0,)  # the cached tau of log_partition's columns; [0] == 1
    topk_ids: Any = None  # [T, K] int, descending probability
    topk_logprobs: Any = None  # [T, K] float at tau = 1
    draw_ids: Any = None  # [T, D] int: unique sampled ids, 0 on padding
    draw_counts: Any = None  # [T, D] int: how often each was drawn, 0 on padding
    draw_logprobs: Any = None  # [T, D] float: the teacher's tau = 1 log-prob at each stored draw (v2)
    draw_temperature: float = 1.0  # the temperature the draws were made at
    router_ids: Any = None  # [T, L, R] int, L = the stored MoE layers (identity['moe_layers']), any order
    router_probs: Any = None  # [T, L, R] float, in router_ids' order (absent for an ids-only router cache)

    def arrays(self) -> dict[str, Any]:
        """The arrays present, by field name."""
        return {f.name: v for f in dataclass_fields(self) if f.name not in METADATA
                and (v := getattr(self, f.name)) is not None}

    def map(self, fn: Callable[[Any], Any]) -> "TeacherRecord":
        """The same record with fn applied to every array (to tensors, to a device, a row selection)."""
        return replace(self, **{k: fn(v) for k, v in self.arrays().items()})

    def pin_memory(self) -> "TeacherRecord":  # torch's DataLoader calls this on a record of tensors
        return self.map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "TeacherRecord":
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))


@dataclass
class Sequences:
    """Whole sequences, flat over their tokens (T), with the teacher's record when there is one
    (None for prepared data trained without a teacher)."""

    sample_ids: Any  # [S] int64
    seq_lens: Any  # [S] int64, sums to T
    input_ids: Any  # [T] int
    loss_mask: Any  # [T] uint8
    teacher: TeacherRecord | None = None

    def arrays(self) -> dict[str, Any]:
        """Every array, the teacher's included, by field name."""
        own = {k: getattr(self, k) for k in SEQUENCE_FIELDS}
        return own | (self.teacher.arrays() if self.teacher is not None else {})


def pad_draws(draw_n_T: np.ndarray, values: list[np.ndarray], width: int = 0) -> list[np.ndarray]:
    """Ragged per-token draw arrays ([D] each, draw_n_T[t] entries for token t) as [T, width] arrays,
    zero-padded (width: at least the longest row)."""
    n_T = np.asarray(draw_n_T, np.int64)
    width = max(width, int(n_T.max()) if len(n_T) else 0, 1)
    rows = np.repeat(np.arange(len(n_T)), n_T)
    cols = np.arange(len(rows)) - np.repeat(np.cumsum(n_T) - n_T, n_T)
    out = []
    for v in values:
        padded = np.zeros((len(n_T), width), v.dtype)
        padded[rows, cols] = v
        out.append(padded)
    return out


def widen(a: np.ndarray, width: int) -> np.ndarray:
    """[T, D] zero-padded to [T, width] (width >= D)."""
    return a if a.shape[1] == width else np.pad(a, ((0, 0), (0, width - a.shape[1])))


def concat_sequences(parts: list[Sequences]) -> Sequences:
    """The records one after the other (draws padded to the widest)."""
    first = parts[0]
    cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in SEQUENCE_FIELDS}
    if first.teacher is None:
        return Sequences(**cat)
    teachers = [p.teacher for p in parts]
    width = max(t.draw_ids.shape[1] for t in teachers) if first.teacher.draw_ids is not None else 0
    fields = {}
    for key in first.teacher.arrays():
        arrays = [getattr(t, key) for t in teachers]
        fields[key] = np.concatenate([widen(a, width) for a in arrays] if key in PADDED_DRAWS else arrays)
    return Sequences(**cat, teacher=replace(first.teacher, **fields))


PADDED_DRAWS = ("draw_ids", "draw_counts", "draw_logprobs")
SEQUENCE_FIELDS = ("sample_ids", "seq_lens", "input_ids", "loss_mask")


def sequences_from_flat(flat: dict[str, Any], temperatures: tuple[float, ...] = (1.0,)) -> Sequences:
    """A Sequences record from flat arrays named as the stored fields, draws ragged (``draw_n`` per
    token, ``draw_ids``/``draw_counts`` flat): how synthetic records in tests and benchmarks are written."""
    flat = dict(flat)
    if "draw_n" in flat:
        keys = [k for k in PADDED_DRAWS if k in flat]
        flat.update(zip(keys, pad_draws(flat.pop("draw_n"), [flat[k] for k in keys])))
    teacher = {k: v for k, v in flat.items() if k not in SEQUENCE_FIELDS}
    return Sequences(**{k: flat[k] for k in SEQUENCE_FIELDS},
                     teacher=TeacherRecord(temperatures=temperatures, **teacher) if teacher else None)


def ragged_arange(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenated aranges [starts[i], ends[i]), int64, without a Python loop."""
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    lens = ends - starts
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    keep = lens > 0
    starts, lens = starts[keep], lens[keep]
    step = np.ones(total, np.int64)  # +1 within a range, a jump to the next start at each range's first row
    firsts = np.cumsum(lens)[:-1]
    step[0] = starts[0]
    step[firsts] = starts[1:] - (starts[:-1] + lens[:-1] - 1)
    return np.cumsum(step)


def take_sequences(seqs_in: Sequences, seqs: np.ndarray) -> Sequences:
    """The sequences ``seqs`` (indices, in that order) of a flat record, as fresh arrays: the writer's
    batch split and the stream's reorder."""
    seqs = np.asarray(seqs, np.int64)
    starts = np.concatenate([[0], np.cumsum(np.asarray(seqs_in.seq_lens, np.int64))])
    tokens = ragged_arange(starts[seqs], starts[seqs + 1])
    teacher = None if seqs_in.teacher is None else seqs_in.teacher.map(lambda a: a[tokens])
    return Sequences(sample_ids=seqs_in.sample_ids[seqs], seq_lens=seqs_in.seq_lens[seqs],
                     input_ids=seqs_in.input_ids[tokens], loss_mask=seqs_in.loss_mask[tokens], teacher=teacher)
