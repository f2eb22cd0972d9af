"""Test helpers: read a whole cache into {sample_id: fields} and compare two caches by sample id."""

from __future__ import annotations

import numpy as np

from cache.reader import CacheReader
from cache.schema import TeacherRecord

PER_TOKEN = ("input_ids", "loss_mask", "target_logprob", "log_partition", "topk_ids", "topk_logprobs",
             "router_ids", "router_probs")


def by_sample(cache_dir) -> dict[int, dict[str, np.ndarray]]:
    """Every sequence of a finished cache, decoded, keyed by sample id (duplicates are an error).
    Draws as stored: ``draw_n`` per token, the drawn ids and counts flat (no padding)."""
    reader = CacheReader(cache_dir)
    out: dict[int, dict[str, np.ndarray]] = {}
    for info in reader.shards:
        rec = reader.read_shard(info.name)
        starts = np.concatenate([[0], np.cumsum(rec.seq_lens)])
        fields = {"input_ids": rec.input_ids, "loss_mask": rec.loss_mask, **rec.teacher.arrays()}
        for j, sid in enumerate(rec.sample_ids.tolist()):
            a, b = int(starts[j]), int(starts[j + 1])
            seq = {k: v[a:b] for k, v in fields.items() if k in PER_TOKEN}
            if rec.teacher.draw_ids is not None:
                drawn = rec.teacher.draw_counts[a:b] > 0
                seq.update(draw_n=drawn.sum(1), draw_ids=rec.teacher.draw_ids[a:b][drawn],
                           draw_counts=rec.teacher.draw_counts[a:b][drawn])
                seq["draw_logprobs"] = rec.teacher.draw_logprobs[a:b][drawn]
            assert sid not in out, f"sample {sid} is cached twice"
            out[sid] = seq
    reader.close()
    return out


def assert_same_cache(got: dict, want: dict) -> None:
    """Exact equality, sample by sample and field by field."""
    assert sorted(got) == sorted(want), "the caches hold different sample ids"
    for sid in want:
        assert sorted(got[sid]) == sorted(want[sid]), f"sample {sid}: different fields"
        for key, value in want[sid].items():
            np.testing.assert_array_equal(got[sid][key], value, err_msg=f"sample {sid} field {key}")


def targets(topk_ids_TK, topk_logprobs_TK, log_partition_TP, temperatures, draw_ids_TD=None, draw_weights_TD=None,
            draw_logprobs_TD=None, draw_temperature: float = 1.0):
    """A teacher record of tensors for loss tests (draw weights stand in for counts: the loss
    normalises counts per token, so weights summing to 1 are the same target)."""
    return TeacherRecord(log_partition=log_partition_TP, temperatures=tuple(temperatures), topk_ids=topk_ids_TK,
                         topk_logprobs=topk_logprobs_TK, draw_ids=draw_ids_TD, draw_counts=draw_weights_TD,
                         draw_logprobs=draw_logprobs_TD, draw_temperature=draw_temperature)
