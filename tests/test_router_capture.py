"""Router probabilities in the cache vs softmax(F.linear(h, gate.weight)) computed here.

h is the router's input, captured by our own forward_pre_hook on each decoder layer's
``mlp.gate`` while the saved model runs one unpadded sequence. Router probabilities are
stored as float16: |Δ| ≤ 2^-11 for values ≤ 1, so atol = 1e-3; a row of E=8 fp16 values
sums to 1 within 8 · 2^-11 ≈ 4e-3, so atol = 5e-3 for row sums.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cache_helpers import by_sample

from cache.schema import read_manifest
from pipeline.config import ConfigError
from pipeline.router import ROUTER_FAMILIES, check_raw_logits, router_family
from pipeline.run_paths import cache_dir
from stages import cache_teacher, prepare

PROB_ATOL, SUM_ATOL = 1e-3, 5e-3
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
EXPERTS = 8


def run_cache(make_config, *overrides, teacher="qwen3_moe"):
    cfg = make_config("data.max_samples=6", "data.max_length=32", "data.eval_fraction=0", "cache.splits=[train]",
                      "cache.batch_size=3", *overrides, teacher=teacher)
    prepare.run(cfg)
    cache_teacher.run(cfg)
    out_dir = cache_dir(cfg.run_dir, "train")
    return cfg, by_sample(out_dir), read_manifest(out_dir)


@functools.lru_cache(maxsize=4)
def load_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def reference_router_probs(model_dir, ids: np.ndarray) -> np.ndarray:
    """[T, L, E] = softmax(h @ W_gate^T) per MoE layer, h captured by a forward pre-hook."""
    model = load_model(str(model_dir))
    gates = [layer.mlp.gate for layer in model.model.layers]
    inputs: list[torch.Tensor] = []
    handles = [g.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach())) for g in gates]
    model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None])
    for h in handles:
        h.remove()
    assert len(inputs) == len(gates)
    probs = [torch.softmax(F.linear(h.reshape(-1, g.weight.shape[1]).float(), g.weight.float()), -1)
             for h, g in zip(inputs, gates)]
    return torch.stack(probs, 1).numpy()


def dense(seq: dict) -> np.ndarray:
    out = np.zeros(seq["router_ids"].shape[:2] + (EXPERTS,), np.float32)
    np.put_along_axis(out, seq["router_ids"].astype(np.int64), seq["router_probs"].astype(np.float32), axis=2)
    return out


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_probs_match_reference(make_config, family):
    cfg, cache, manifest = run_cache(make_config, "cache.router_topk=all", "cache.preset=exact", teacher=family)
    assert {"router_ids", "router_probs"} <= set(manifest.fields)
    assert manifest.identity["num_experts"] == EXPERTS and manifest.identity["moe_layers"] == [0, 1]
    for seq in cache.values():
        T = len(seq["input_ids"])
        assert seq["router_ids"].shape == (T, 2, EXPERTS) and seq["router_probs"].dtype == np.float32
        got = dense(seq)
        np.testing.assert_allclose(got, reference_router_probs(cfg.teacher.path, seq["input_ids"]), atol=PROB_ATOL)
        np.testing.assert_allclose(seq["router_probs"].astype(np.float32).sum(-1), 1.0, atol=SUM_ATOL)
        assert (np.sort(seq["router_ids"], axis=2) == np.arange(EXPERTS)).all(), "every expert once per row"


def test_double_softmax_trap(make_config, tokenizer, tmp_path):
    """Peaked router logits: the stored max prob is ~1, where softmax(softmax(.)) gives < 0.3."""
    from transformers import AutoModelForCausalLM

    from pipeline.demo import tiny_config

    peaked = tmp_path / "peaked"
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe", len(tokenizer)))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(200.0)
    model.save_pretrained(peaked)
    tokenizer.save_pretrained(peaked)
    cfg, cache, _ = run_cache(make_config, f"teacher.path={peaked}", "cache.preset=exact")
    double_max = np.exp(1.0) / (np.exp(1.0) + EXPERTS - 1)  # the most a twice-softmaxed row can reach
    for seq in cache.values():
        ref = reference_router_probs(peaked, seq["input_ids"])
        stored_max = seq["router_probs"].astype(np.float32).max(-1)
        np.testing.assert_allclose(stored_max, ref.max(-1), atol=PROB_ATOL)
        assert stored_max.mean() > 0.9, "the peaked router should be confident"
        assert (stored_max > double_max + 0.2).mean() > 0.9
        twice = torch.softmax(torch.from_numpy(ref), -1).max(-1).values.numpy()
        assert (np.abs(stored_max - twice) > 0.5).mean() > 0.8


@pytest.mark.parametrize("preset, bound", [("balanced", 1 / 32), ("compact", 1 / 16)])
def test_quantised_router_probs_are_within_the_codec_bound(make_config, preset, bound):
    """8-bit (balanced) and 7-bit (compact) router probabilities: |Δ log p| ≤ half a step of the reference."""
    cfg, cache, manifest = run_cache(make_config, "cache.router_topk=all", f"cache.preset={preset}")
    for seq in cache.values():
        ref = reference_router_probs(cfg.teacher.path, seq["input_ids"])
        picked = np.take_along_axis(ref, seq["router_ids"].astype(np.int64), axis=2)
        assert np.abs(np.log(seq["router_probs"]) - np.log(picked)).max() <= bound + 1e-4
        assert (np.diff(seq["router_ids"].astype(np.int64), axis=-1) > 0).all(), "by ascending expert id"


@pytest.mark.parametrize("layers, want", [("last", [1]), ("[0]", [0]), ("every:2", [0])])
def test_router_layers_store_only_those_layers(make_config, layers, want):
    cfg, cache, manifest = run_cache(make_config, "cache.router_topk=all", f"cache.router_layers={layers}")
    assert manifest.identity["moe_layers"] == want
    assert all(seq["router_ids"].shape[1] == len(want) for seq in cache.values())


def test_router_layers_outside_the_teachers_moe_layers_is_one_line(make_config):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError) as info:
        run_cache(make_config, "cache.router_layers=[1,5]")
    message = str(info.value)
    assert "[5]" in message and "allowed: 0, 1" in message and "\n" not in message


def test_check_raw_logits_refuses_probability_rows():
    logits = torch.randn(16, EXPERTS) * 3
    check_raw_logits(logits)  # raw logits pass
    with pytest.raises(RuntimeError, match="already softmaxed"):
        check_raw_logits(torch.softmax(logits, -1))
    with pytest.raises(RuntimeError):
        check_raw_logits(torch.softmax(logits, -1).half())
    check_raw_logits(torch.softmax(logits, -1) * 0.5)  # non-negative but not normalised: not flagged


def test_router_topk_2_is_the_top2_of_the_same_distribution(make_config):
    cfg, cache, manifest = run_cache(make_config, "cache.router_topk=2", "cache.preset=exact")
    assert manifest.identity["router_topk"] == 2
    for seq in cache.values():
        ref = reference_router_probs(cfg.teacher.path, seq["input_ids"])
        assert seq["router_ids"].shape == (len(seq["input_ids"]), 2, 2)
        ref_vals, ref_ids = torch.topk(torch.from_numpy(ref), 2, dim=-1)
        by_prob = np.argsort(-seq["router_probs"], axis=-1, kind="stable")  # stored by expert id
        probs, ids = (np.take_along_axis(seq[key], by_prob, -1) for key in ("router_probs", "router_ids"))
        np.testing.assert_allclose(probs.astype(np.float32), ref_vals.numpy(), atol=PROB_ATOL)
        clear = (ref_vals[..., 0] - ref_vals[..., 1] > 1e-3).numpy()
        np.testing.assert_array_equal(ids[..., 0][clear], ref_ids[..., 0].numpy()[clear])
        picked = np.take_along_axis(ref, ids.astype(np.int64), axis=2)
        np.testing.assert_allclose(picked, ref_vals.numpy(), atol=PROB_ATOL)


@pytest.mark.parametrize("teacher,overrides", [("qwen3_moe", ["cache.router_topk=none"]), ("qwen3", []), ("llama", [])])
def test_no_router_fields(make_config, teacher, overrides):
    _, cache, manifest = run_cache(make_config, *overrides, teacher=teacher)
    assert not {"router_ids", "router_probs"} & set(manifest.fields)
    assert manifest.identity["router_topk"] == 0
    for seq in cache.values():
        assert "router_ids" not in seq and "router_probs" not in seq
        assert seq["topk_ids"].shape[1] == 8


def test_unsupported_moe_family_is_one_line_error():
    config = types.SimpleNamespace(model_type="deepseek_v9", num_experts=16)
    with pytest.raises(ConfigError) as info:
        router_family(config)
    message = str(info.value)
    assert "\n" not in message and "deepseek_v9" in message and "router_topk=none" in message
    assert all(name in message for name in ROUTER_FAMILIES)
    assert router_family(types.SimpleNamespace(model_type="llama", num_experts=0)) is None
