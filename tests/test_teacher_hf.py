"""HF teacher extraction against an independent dense reference.

The reference runs the saved tiny model with transformers, one unpadded sequence at a time,
and takes the full fp32 log_softmax. Tolerances:
- top-k / target log-probs are stored by the default preset (balanced) as 16-bit steps of 2^-10 nats
  (|error| ≤ 2^-11): atol = one step (2^-10) + 1e-5, which also covers batch-size / chunking comparisons
  (a fp32 difference of ~1e-6 can move a value across a rounding boundary: one step);
- log_partition is stored as float32 in the gauge log Z_1 = 0 (column tau: logsumexp(z/tau) - logsumexp(z)/tau):
  atol = rtol = 1e-4 (fp32 forward of a padded batch vs one sequence differs by ~1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cache_helpers import by_sample

from pipeline.run_paths import cache_dir
from stages import cache_teacher, prepare

FP16_RTOL, FP16_ATOL = 0.0, 2.0**-10 + 1e-5  # the quantiser's step (names kept from v1's fp16)
K = 8


def run_cache(make_config, *overrides, teacher="qwen3_moe"):
    cfg = make_config("data.max_samples=12", "data.max_length=40", "data.eval_fraction=0", f"cache.k={K}",
                      "cache.splits=[train]", "cache.temperatures=[1.0,2.0]", *overrides, teacher=teacher)
    prepare.run(cfg)
    cache_teacher.run(cfg)
    return cfg, by_sample(cache_dir(cfg.run_dir, "train"))


@pytest.fixture(scope="module")
def dense_reference():
    """dense_reference(model_dir, ids) → fp32 logits [L, V] of one unpadded sequence."""
    from transformers import AutoModelForCausalLM

    models = {}

    def logits(model_dir, ids: np.ndarray) -> torch.Tensor:
        if model_dir not in models:
            models[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            return models[model_dir](input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].float()

    return logits


def check_topk(seq: dict, ref_lp: np.ndarray) -> None:
    """Cached top-k = torch.topk of the reference (up to ties), with the reference's values."""
    ids, lp = seq["topk_ids"], seq["topk_logprobs"]
    ref_vals, ref_ids = torch.topk(torch.from_numpy(ref_lp), K + 1, dim=-1)
    ref_vals, ref_ids = ref_vals.numpy(), ref_ids.numpy()
    np.testing.assert_allclose(lp, np.take_along_axis(ref_lp, ids, 1), rtol=FP16_RTOL, atol=FP16_ATOL)
    np.testing.assert_allclose(lp, ref_vals[:, :K], rtol=FP16_RTOL, atol=FP16_ATOL)
    assert (np.diff(lp, axis=1) <= 0).all(), "stored by descending probability"
    clear = ref_vals[:, K - 1] - ref_vals[:, K] > 1e-4  # no tie at the k-th place
    for t in np.flatnonzero(clear):
        assert set(ids[t]) == set(ref_ids[t, :K]), f"position {t}"
    assert clear.mean() > 0.9


def test_matches_dense_log_softmax(make_config, dense_reference):
    cfg, cache = run_cache(make_config)
    assert len(cache) == 12
    for sid, seq in cache.items():
        ids = seq["input_ids"]
        z = dense_reference(cfg.teacher.path, ids)
        ref_lp = torch.log_softmax(z, dim=-1).numpy()
        check_topk(seq, ref_lp)
        target = ref_lp[np.arange(len(ids) - 1), ids[1:]]
        np.testing.assert_allclose(seq["target_logprob"][:-1], target, rtol=FP16_RTOL, atol=FP16_ATOL)
        assert seq["target_logprob"][-1] == 0 and seq["loss_mask"][-1] == 0, "the last position has no target"
        for p, tau in enumerate((1.0, 2.0)):  # the gauge log Z_1 = 0
            ref_lz = (torch.logsumexp(z / tau, dim=-1) - torch.logsumexp(z, dim=-1) / tau).numpy()
            np.testing.assert_allclose(seq["log_partition"][:, p], ref_lz, rtol=1e-4, atol=1e-4)
        assert seq["log_partition"].dtype == np.float32


def test_padding_does_not_change_results(make_config):
    """Batch size 1 (no padding) vs 4 (each sequence padded to its batch's longest)."""
    _, alone = run_cache(make_config, "cache.batch_size=1", "run.name=alone", "data.max_length=160")
    _, batched = run_cache(make_config, "cache.batch_size=4", "run.name=batched", "data.max_length=160")
    lengths = sorted({len(s["input_ids"]) for s in batched.values()})
    assert len(lengths) > 1, "the batches must mix lengths for padding to happen"
    assert sorted(alone) == sorted(batched)
    for sid in alone:
        a, b = alone[sid], batched[sid]
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
        for key in ("topk_logprobs", "target_logprob", "log_partition"):
            np.testing.assert_allclose(a[key], b[key], rtol=FP16_RTOL, atol=FP16_ATOL, err_msg=key)
        gap = np.abs(np.diff(a["topk_logprobs"].astype(np.float32), axis=1)).min(axis=1) > 1e-2
        np.testing.assert_array_equal(a["topk_ids"][gap], b["topk_ids"][gap])
        np.testing.assert_allclose(np.log(a["router_probs"]), np.log(b["router_probs"]), atol=1 / 16 + 1e-5)  # a step


def test_chunked_extraction_equals_unchunked(make_config):
    _, whole = run_cache(make_config, "cache.extract_chunk_tokens=4096", "run.name=whole",
                         "cache.targets=topk+sampled", "cache.num_draws=16")
    _, chunked = run_cache(make_config, "cache.extract_chunk_tokens=7", "run.name=chunked",
                           "cache.targets=topk+sampled", "cache.num_draws=16")
    assert sorted(whole) == sorted(chunked)
    for sid in whole:
        for key, value in whole[sid].items():
            # row-wise top-k / logsumexp / sampling of the same logits: exact
            np.testing.assert_array_equal(chunked[sid][key], value, err_msg=f"{sid} {key}")


def test_padded_vocabulary_is_ignored(make_config, dense_reference, tokenizer, tmp_path):
    """A teacher whose embedding has more rows than the tokenizer: the extra ids are padding."""
    from pipeline.demo import save_tiny_model, tiny_config

    real = len(tokenizer)
    path = save_tiny_model(tiny_config("qwen3", real + 24), tmp_path / "padded_vocab", tokenizer, seed=3)
    _, cache = run_cache(make_config, "data.max_samples=4", f"teacher.path={path}")
    for seq in cache.values():
        z = dense_reference(str(path), seq["input_ids"])
        assert z.shape[1] == real + 24
        ref_lp = torch.log_softmax(z[:, :real], dim=-1).numpy()
        check_topk(seq, ref_lp)
        assert seq["topk_ids"].max() < real
        gauge = torch.logsumexp(z[:, :real] / 2, -1) - torch.logsumexp(z[:, :real], -1) / 2
        np.testing.assert_allclose(seq["log_partition"][:, 1], gauge.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("setting, cuda, want_cpu", [("cpu", True, True), ("auto", True, False),
                                                     ("auto", False, True), ("cuda", True, False)])
def test_cache_stage_runs_the_teacher_on_run_device(make_config, monkeypatch, setting, cuda, want_cpu):
    """run.device reaches the teacher: 'cpu' keeps it off a visible GPU (it used to be ignored)."""
    from pipeline.config import ConfigError
    from pipeline.distributed import Dist

    cfg = make_config("data.max_samples=4", "data.eval_fraction=0", f"run.device={setting}")
    prepare.run(cfg)
    asked = {}

    def from_env(cpu=None, timeout_s=None):
        asked["cpu"] = cpu
        return Dist(rank=0, world_size=1, device=torch.device("cpu" if cpu else "cuda", 0 if not cpu else None))

    def build_teacher(teacher_cfg, spec, device):
        asked["device"] = device
        raise ConfigError("stop here: the device is what this test checks")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(cache_teacher.Dist, "from_env", staticmethod(from_env))
    monkeypatch.setattr(cache_teacher, "build_teacher", build_teacher)
    with pytest.raises(ConfigError, match="stop here"):
        cache_teacher.run(cfg)
    assert asked["cpu"] is want_cpu and asked["device"].type == ("cpu" if want_cpu else "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_run_device_cuda_without_cuda_is_one_line(make_config):
    from pipeline.config import ConfigError

    cfg = make_config("run.device=cuda")
    with pytest.raises(ConfigError, match="run.device=cuda but no CUDA device"):
        cache_teacher.run(cfg)


def test_head_apart_only_where_the_logits_are_the_head_of_the_last_hidden_state(make_config):
    """The teacher runs the body alone and the LM head per extraction chunk for the families listed in
    HEAD_APART_FAMILIES (the tests above check those caches against the model's own logits); a family
    with a transform after the head (Gemma 2's logit soft-capping) keeps the model's forward."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    from pipeline.teachers.extract import HeadRows
    from pipeline.teachers.hf import head_apart

    cfg = make_config()
    qwen = AutoModelForCausalLM.from_pretrained(cfg.teacher.path, dtype=torch.float32).eval()
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        rows = HeadRows(qwen.base_model(input_ids=ids).last_hidden_state[0], qwen.get_output_embeddings())
        torch.testing.assert_close(torch.cat([rows[0:5], rows[5:16]]), qwen(input_ids=ids).logits[0])
    assert head_apart(qwen)
    gemma = AutoModelForCausalLM.from_config(Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5)).eval()
    with torch.no_grad():
        hidden = gemma.base_model(input_ids=ids % 64).last_hidden_state[0]
        apart = gemma.get_output_embeddings()(hidden)
        assert not torch.allclose(apart, gemma(input_ids=ids % 64).logits[0], atol=1e-3), "soft-capped"
    assert not head_apart(gemma)
