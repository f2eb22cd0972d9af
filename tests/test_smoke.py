"""End-to-end smoke test of phase one on the tiny Qwen3-MoE teacher."""

from cache.reader import CacheReader
from pipeline.run_paths import cache_dir
from stages import cache_teacher, prepare


def test_prepare_and_cache_roundtrip(make_config):
    cfg = make_config("cache.targets=topk+sampled", "cache.temperatures=[1.0,2.0]")
    prepare.run(cfg)
    manifests = cache_teacher.run(cfg)
    reader = CacheReader(cache_dir(cfg.run_dir, "train"))
    out = reader.read_shard(reader.shards[0].name)
    assert out.teacher.topk_ids.shape[1] == 8
    assert manifests["train"].n_tokens == sum(s.n_tokens for s in reader.shards)
    assert reader.verify() == []
