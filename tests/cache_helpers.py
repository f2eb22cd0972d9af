"""Test helpers: read a whole cache into {sample_id: fields} and compare two caches by sample id."""

from __future__ import annotations

import numpy as np

from cache.reader import CacheReader

PER_TOKEN = ("input_ids", "loss_mask", "target_logprob", "log_partition", "topk_ids", "topk_logprobs",
             "router_ids", "router_probs")


def by_sample(cache_dir) -> dict[int, dict[str, np.ndarray]]:
    """Every sequence of a finished cache, decoded, keyed by sample id (duplicates are an error)."""
    reader = CacheReader(cache_dir)
    out: dict[int, dict[str, np.ndarray]] = {}
    for info in reader.shards:
        rec = reader.read_shard(info.name)
        starts = np.concatenate([[0], np.cumsum(rec.seq_lens)])
        draw_starts = np.concatenate([[0], np.cumsum(rec.draw_n)]) if rec.draw_n is not None else None
        for j, sid in enumerate(rec.sample_ids.tolist()):
            a, b = int(starts[j]), int(starts[j + 1])
            seq = {k: getattr(rec, k)[a:b] for k in PER_TOKEN if getattr(rec, k) is not None}
            if draw_starts is not None:
                seq["draw_n"] = rec.draw_n[a:b]
                seq["draw_ids"] = rec.draw_ids[draw_starts[a]:draw_starts[b]]
                seq["draw_counts"] = rec.draw_counts[draw_starts[a]:draw_starts[b]]
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
