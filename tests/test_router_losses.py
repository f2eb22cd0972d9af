"""MoE-to-MoE router losses (issue 5), each against an independent reference:
ERD vs its formula in numpy, MC draws vs a per-token Python loop on the same uniforms, coverage
KL vs numpy, the aux loss vs the family model's own ``output_router_logits`` path; gradients
reach the router weights and τ_r; a 1-layer/4-expert student learns from a 2-layer/8-expert
teacher's cache end to end; a dense student is refused with one line.
"""

from __future__ import annotations

import json
from dataclasses import replace
import math

import numpy as np
import pytest
import torch

from cache.schema import TeacherRecord

from pipeline.config import ConfigError
from pipeline.router import map_experts, router_kl, uniform_layer_map
from pipeline.router_losses import (MC_TARGETS, RouterLossSpec, aux_loss, coverage_kl, draw_uniforms, erd_loss,
                                    load_summary, map_experts_explicit, mc_loss, mc_weights, suppressed_draws)

T, E = 12, 4


def random_dist(t: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(t, e, generator=g), -1)


def random_logits(t: int, e: int, seed: int) -> torch.Tensor:
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed))


# --- pure losses vs references ----------------------------------------------------------------


def test_erd_matches_direct_formula():
    g, q, tau, beta = random_logits(T, E, 1), random_dist(T, E, 2), 0.8, 0.1
    got = erd_loss(g, q, torch.tensor(tau), beta).numpy()
    for t in range(T):
        z = np.exp(g[t].double().numpy() / tau)
        p = z / z.sum()
        qt = q[t].double().numpy()
        want = np.sum(qt * np.log(qt / p)) + beta * np.sum(p * np.log(p))
        assert got[t] == pytest.approx(want, abs=1e-5)


def test_erd_at_tau_one_without_entropy_is_router_kl():
    g, q = random_logits(T, E, 3), random_dist(T, E, 4)
    torch.testing.assert_close(erd_loss(g, q, torch.tensor(1.0), 0.0), router_kl(g, q))


def loop_draws(p_row: list[float], uniforms: list[float], suppress: float) -> tuple[list[int], list[float]]:
    """Reference: sequential inverse-CDF draws with suppression, one token, plain Python floats."""
    p, ids, weights = list(p_row), [], []
    for u in uniforms:
        total, acc, pick = sum(p), 0.0, len(p) - 1
        for e, pe in enumerate(p):
            acc += pe
            if acc > u * total:
                pick = e
                break
        ids.append(pick)
        weights.append(p[pick] / total)
        p[pick] *= suppress
    return ids, weights


def test_mc_draws_and_loss_match_loop_reference():
    q, g = random_dist(T, E, 5), random_logits(T, E, 6)
    uniforms = draw_uniforms(torch.tensor([7, 9]), torch.tensor([5, 7]), seed=3, step=11, draws=3)
    ids, w = suppressed_draws(q, uniforms, 0.5)
    got = mc_loss(g, ids, w).numpy()
    log_p = torch.log_softmax(g.double(), -1).numpy()
    for t in range(T):
        ref_ids, ref_w = loop_draws(q[t].double().tolist(), uniforms[t].double().tolist(), 0.5)
        assert ids[t].tolist() == ref_ids
        np.testing.assert_allclose(w[t].numpy(), ref_w, rtol=1e-5)
        assert got[t] == pytest.approx(-sum(wk * log_p[t, k] for k, wk in zip(ref_ids, ref_w)), abs=1e-5)


def test_draws_follow_teacher_and_suppression_spreads_them():
    q = torch.tensor([[0.7, 0.2, 0.1, 0.0]]).repeat(20000, 1)
    uniforms = torch.rand(20000, 2, generator=torch.Generator().manual_seed(0))
    ids, _ = suppressed_draws(q, uniforms, 1.0)
    freq = torch.bincount(ids[:, 0], minlength=4).float() / 20000
    torch.testing.assert_close(freq, q[0], atol=0.015, rtol=0)
    assert freq[3] == 0, "an expert of probability 0 is never drawn"
    ids, w = suppressed_draws(q, uniforms, 0.5)
    second = ids[:, 1][ids[:, 0] == 0]  # after expert 0 (0.7 → 0.35): 0.35/0.65 for it again
    assert (second == 0).float().mean() == pytest.approx(0.35 / 0.65, abs=0.02)


def enumerated_target(q: list[float], draws: int, suppress: float, target: str) -> np.ndarray:
    """Reference: E[Σ_k ŵ_k·onehot(e_k)] exactly, summing over every sequence of K draws in float64.

    Each draw picks e with probability p(e)/Σp, then p(e) ← suppress·p(e); ŵ_k = 1/K for
    'suppressed', w_k/Σw with w_k = the probability e_k was drawn with for 'bdistill'."""
    out = np.zeros(len(q))

    def walk(p: np.ndarray, path: list[int], probs: list[float], chance: float) -> None:
        if len(path) == draws:
            w = np.full(draws, 1.0 / draws) if target == "suppressed" else np.array(probs) / sum(probs)
            for e, wk in zip(path, w):
                out[e] += chance * wk
            return
        for e in range(len(p)):
            pe = p[e] / p.sum()
            if pe > 0:
                nxt = p.copy()
                nxt[e] *= suppress
                walk(nxt, path + [e], probs + [pe], chance * pe)

    walk(np.array(q, dtype=np.float64), [], [], 1.0)
    return out


def implied_target(q: list[float], draws: int, suppress: float, target: str, rows: int) -> torch.Tensor:
    """The target the implementation trains towards, averaged over ``rows`` independent draws:
    mc_loss's gradient in the logits is Σŵ·p_S − Σ_k ŵ_k·onehot(e_k), so the target is p_S − grad."""
    q_TE = torch.tensor(q).repeat(rows, 1)
    uniforms = torch.rand(rows, draws, generator=torch.Generator().manual_seed(11))
    ids, drawn = suppressed_draws(q_TE, uniforms, suppress)
    logits = torch.zeros(rows, len(q), requires_grad=True)
    mc_loss(logits, ids, mc_weights(drawn, target)).sum().backward()
    return (torch.softmax(logits.detach(), -1) - logits.grad).double().mean(0)


@pytest.mark.parametrize("target", list(MC_TARGETS))
def test_mc_implied_target_matches_exact_expectation(target):
    q = [0.55, 0.25, 0.1, 0.05, 0.05]
    for draws in (1, 3):
        want = enumerated_target(q, draws, 0.5, target)
        assert want.sum() == pytest.approx(1.0)
        got = implied_target(q, draws, 0.5, target, rows=200_000)
        np.testing.assert_allclose(got.numpy(), want, atol=5e-3)  # 200k draws: standard error ≤ 1.2e-3
    if target == "bdistill":  # B-Distill's weighting sharpens the teacher: top expert 0.55 → 0.68
        assert want[0] == pytest.approx(0.678, abs=1e-3) and want[0] > q[0] + 0.1
    else:  # the teacher after suppression is flatter than the teacher: exploration spreads
        assert want[0] == pytest.approx(0.487, abs=1e-3) and (want[2:] > np.array(q[2:])).all()


def test_mc_one_draw_without_suppression_targets_the_teacher_in_both_modes():
    q = [0.55, 0.25, 0.1, 0.05, 0.05]
    for target in MC_TARGETS:
        np.testing.assert_allclose(enumerated_target(q, 1, 1.0, target), q, atol=1e-12)
    with pytest.raises(ValueError, match="allowed: suppressed, bdistill"):
        mc_weights(torch.ones(2, 3), "paper")


def test_mc_target_is_a_checked_config_choice():
    from pipeline.config import load_config
    from stages.config import PipelineConfig

    assert load_config(PipelineConfig).train.router_mc_target == "suppressed"
    assert load_config(PipelineConfig, overrides=["train.router_mc_target=bdistill"]).train.router_mc_target == "bdistill"
    with pytest.raises(ConfigError, match="train.router_mc_target='q2' is not allowed; allowed: suppressed, bdistill"):
        load_config(PipelineConfig, overrides=["train.router_mc_target=q2"])


def test_draws_keyed_by_seed_step_and_sample_not_by_batch():
    both = draw_uniforms(torch.tensor([4, 8]), torch.tensor([3, 5]), seed=1, step=2, draws=3)
    alone = draw_uniforms(torch.tensor([8]), torch.tensor([5]), seed=1, step=2, draws=3)
    torch.testing.assert_close(both[3:], alone)
    assert not torch.equal(alone, draw_uniforms(torch.tensor([8]), torch.tensor([5]), seed=1, step=3, draws=3))
    assert not torch.equal(alone, draw_uniforms(torch.tensor([8]), torch.tensor([5]), seed=2, step=2, draws=3))


def test_coverage_kl_matches_numpy_and_masks():
    q, g = random_dist(T, E, 8), random_logits(T, E, 9)
    mask = torch.arange(T) % 3 != 0
    p = torch.softmax(g.double(), -1).numpy()[mask.numpy()]
    c_t, c_s = q.double().numpy()[mask.numpy()].mean(0), p.mean(0)
    assert float(coverage_kl(q, g, mask)) == pytest.approx(float(np.sum(c_t * np.log(c_t / c_s))), abs=1e-6)
    assert float(coverage_kl(q, g, torch.zeros(T, dtype=torch.bool))) == 0.0


def test_expert_maps():
    q8 = random_dist(T, 8, 10)
    blocks = tuple(e // 2 for e in range(8))
    torch.testing.assert_close(map_experts_explicit(q8, blocks, 4), map_experts(q8, 4))
    custom = map_experts_explicit(q8, (3, 3, 0, 1, 2, 2, 1, 0), 4)
    torch.testing.assert_close(custom[:, 3], q8[:, 0] + q8[:, 1])
    torch.testing.assert_close(custom.sum(-1), torch.ones(T))
    assert uniform_layer_map(1, 2) == [1] and uniform_layer_map(2, 4) == [0, 3]


def test_load_summary_by_hand():
    out = load_summary(torch.tensor([[4.0, 0.0, 2.0, 2.0]]), torch.tensor([3.0]), 4)
    assert out["load_histogram"] == [[0.5, 0.0, 0.25, 0.25]]
    assert out["load_cv"][0] == pytest.approx(math.sqrt(2) / 2)  # std sqrt(2), mean 2
    assert out["dead_experts"] == [0.25] and out["router_entropy"] == [0.75]


def test_load_balance_is_one_formula_for_inspect_and_training():
    """cache/stats.py's load shares and CV serve numpy (inspect) and device tensors (training,
    evaluation) alike: both equal numpy's std / mean, in float64, a layer without load gives 0."""
    from cache.stats import coefficient_of_variation, load_shares

    counts_LE = np.random.default_rng(0).integers(0, 9, size=(3, 8)).astype(np.float64)
    counts_LE[2] = 0  # a layer no token was routed through
    reference_cv = np.std(counts_LE[:2], axis=1) / np.mean(counts_LE[:2], axis=1)
    for xp_counts in (counts_LE, torch.from_numpy(counts_LE)):
        shares = load_shares(xp_counts)
        cv = np.asarray(coefficient_of_variation(shares), dtype=np.float64)
        np.testing.assert_allclose(cv[:2], reference_cv, rtol=1e-12)
        assert cv[2] == 0 and np.asarray(shares)[2].sum() == 0
        np.testing.assert_allclose(np.asarray(shares)[:2].sum(1), 1.0, rtol=1e-12)
    per_layer = load_summary(torch.from_numpy(counts_LE), torch.zeros(3), 1)
    assert per_layer["load_cv"] == pytest.approx(list(coefficient_of_variation(load_shares(counts_LE))), rel=1e-12)
    assert isinstance(coefficient_of_variation(load_shares(torch.from_numpy(counts_LE))), torch.Tensor)


# --- the family's aux loss vs the model's own path ----------------------------------------------


def numpy_switch_aux(logits: list[np.ndarray], valid: np.ndarray, top_k: int) -> float:
    """E · Σ_e f_e · P_e over all layers' valid rows (Switch Transformer eq. 4-6)."""
    rows = np.concatenate([g[valid] for g in logits])
    p = np.exp(rows - rows.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, -1)[:, :top_k]
    f = np.bincount(top.reshape(-1), minlength=p.shape[1]) / len(rows)
    return p.shape[1] * float(np.sum(f * p.mean(0)))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_aux_loss_matches_family_model(make_model, family):
    from transformers import AutoModelForCausalLM

    from pipeline.router import RouterCapture, router_family

    model = AutoModelForCausalLM.from_pretrained(make_model(family), dtype=torch.float32).eval()
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    attention = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad(), RouterCapture(model, router_family(model.config)) as capture:
        ref = model(input_ids=ids, attention_mask=attention, output_router_logits=True).aux_loss
        logits = capture.pop()
    got = aux_loss(logits, 8, model.config.num_experts_per_tok, attention, family)
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    valid = attention.reshape(-1).bool().numpy()
    assert float(got) == pytest.approx(numpy_switch_aux([g.numpy() for g in logits], valid, 2), rel=1e-5)


# --- the wrapped student: gradients and τ_r -------------------------------------------------------


def student_batch(teacher_layers: int = 2, teacher_experts: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 200, (2, 5), generator=g)
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    n = int(valid.sum())
    probs = torch.softmax(torch.randn(n, teacher_layers, teacher_experts, generator=g), -1)
    top = probs.topk(4, -1)  # a top-4 of 8 router cache: the rest is spread evenly
    labels = torch.where(valid[:, 1:], input_ids[:, 1:], -1)
    labels = torch.cat([labels, torch.full((2, 1), -1)], 1)[valid]
    return {"input_ids": input_ids, "attention_mask": valid.long(), "valid": valid, "labels": labels,
            "loss_mask": labels >= 0, "sample_ids": torch.tensor([5, 6]),
            "teacher": TeacherRecord(log_partition=torch.zeros(n, 1), router_ids=top.indices, router_probs=top.values)}


def wrapped_student(make_model, parts: set[str]):
    from transformers import AutoModelForCausalLM

    from pipeline.router import RouterCapture, router_family
    from pipeline.student import DistillStudent

    path = make_model("qwen3_moe", name="student_1x4", num_hidden_layers=1, num_experts=4)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    capture = RouterCapture(model, router_family(model.config)).__enter__()
    spec = RouterLossSpec(parts=frozenset(parts), top_k=2, model_type="qwen3_moe")
    vocab = model.get_output_embeddings().weight.shape[0]
    return DistillStudent(model, None, vocab, 64, capture, uniform_layer_map(1, 2), 8, spec)


@pytest.mark.parametrize("parts", [{"erd"}, {"mc", "coverage"}, {"aux"}, {"erd", "mc", "coverage", "aux"}])
def test_one_step_moves_router_weights_and_tau(make_model, parts):
    wrapped = wrapped_student(make_model, parts)
    gate = wrapped.model.model.layers[0].mlp.gate.weight
    before_gate = gate.detach().clone()
    tau = wrapped.router_temperature
    assert ("erd" in parts) == (tau is not None)
    assert ("erd" in parts) == ("router_temperature" in dict(wrapped.named_parameters()))
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2, weight_decay=0.0)
    out = wrapped(student_batch(), stats=True)
    assert {"load_cv", "dead_experts", "router_entropy"} == set(out.stats) and parts <= dict(out.losses.items()).keys()
    sum(getattr(out.losses, p) for p in parts).backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0, "the router is not detached"
    optimizer.step()
    assert not torch.equal(gate.detach(), before_gate)
    if tau is not None:
        assert tau.grad is not None and tau.grad.abs().sum() > 0
        assert float(tau.detach()) != 1.0 and 0.5 <= float(tau.detach()) <= 1.5


def test_tau_is_projected_into_range_and_checkpointed(make_model):
    wrapped = wrapped_student(make_model, {"erd"})
    with torch.no_grad():
        wrapped.router_temperature.fill_(2.0)
    wrapped(student_batch())
    assert float(wrapped.router_temperature.detach()) == 1.5
    assert "router_temperature" in wrapped.state_dict()


# --- setup: dense students, expert maps ----------------------------------------------------------


MOE_IDENTITY = {"moe_layers": [0, 1], "router_topk": 8, "num_experts": 8}


@pytest.mark.parametrize("key", ["router_weight", "router_erd_weight", "router_mc_weight", "router_aux_weight"])
def test_dense_student_refuses_router_losses(make_config, make_model, key):
    from stages.train_setup import router_setup

    dense = make_model("qwen3")
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(dense)
    assert router_setup(make_config(f"student.path={dense}"), model, MOE_IDENTITY) == (None, None, None)
    with pytest.raises(ConfigError, match=f"train.{key} > 0 but the student is dense; set train.{key}=0") as err:
        router_setup(make_config(f"student.path={dense}", f"train.{key}=0.1"), model, MOE_IDENTITY)
    assert "\n" not in str(err.value)


def test_expert_map_checked_at_setup(make_config, make_model):
    from transformers import AutoModelForCausalLM

    from stages.train_setup import router_setup

    path = make_model("qwen3_moe", name="student_1x4", num_hidden_layers=1, num_experts=4)
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = make_config(f"student.path={path}", "train.router_erd_weight=1", "train.router_expert_map=[0,0,1,1,2,2,3,3]")
    capture, layer_map, spec = router_setup(cfg, model, MOE_IDENTITY)
    assert layer_map == [1] and spec.expert_map == (0, 0, 1, 1, 2, 2, 3, 3) and spec.parts == {"erd"}
    with pytest.raises(ConfigError, match="train.router_expert_map needs 8 entries"):
        router_setup(make_config(f"student.path={path}", "train.router_mc_weight=1", "train.router_expert_map=[0,4]"),
                     model, MOE_IDENTITY)
    with pytest.raises(ConfigError, match="set train.router_expert_map"):
        router_setup(make_config(f"student.path={path}", "train.router_weight=1"), model,
                     {**MOE_IDENTITY, "num_experts": 6})


# --- end to end: 2-layer/8-expert teacher → 1-layer/4-expert student -------------------------------


def test_smaller_moe_student_trains_on_top4_router_cache(make_config, make_model):
    from stages import cache_teacher, prepare, train_student

    student = make_model("qwen3_moe", name="student_1x4", num_hidden_layers=1, num_experts=4)
    cfg = make_config("data.max_samples=8", "data.max_length=24", "data.eval_fraction=0", "cache.splits=[train]",
                      "cache.router_topk=4", f"student.path={student}", "train.steps=2", "train.batch_size=4",
                      "train.log_every=1", "train.checkpoint_every=2", "train.router_erd_weight=1",
                      "train.router_mc_weight=1", "train.router_aux_weight=0.01", "train.router_weight=0.1")
    prepare.run(cfg)
    cache_teacher.run(cfg)
    final = train_student.run(cfg)
    records = [json.loads(line) for line in (cfg.run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    for key in ("ce", "kd", "router", "erd", "mc", "coverage", "aux", "load_cv", "dead_experts", "router_entropy"):
        assert all(math.isfinite(r[key]) for r in records), key
    tau = json.loads((final / "router_temperature.json").read_text())
    assert tau["teacher_moe_layers"] == [1] and len(tau["router_temperature"]) == 1
    assert tau["router_temperature"][0] != 1.0
    from safetensors.torch import load_file

    saved = load_file(cfg.run_dir / "train" / "checkpoints" / "step-000002" / "model.safetensors")
    assert saved["router_temperature"].tolist() == pytest.approx(tau["router_temperature"], abs=1e-6)


def test_evaluate_reports_expert_load(make_model):
    from transformers import AutoModelForCausalLM

    from stages.evaluate import evaluate_model, format_results

    batch = student_batch()
    batch["teacher"] = replace(batch["teacher"], router_ids=None, router_probs=None)
    moe = AutoModelForCausalLM.from_pretrained(make_model("qwen3_moe"), dtype=torch.float32)
    out = evaluate_model(moe, [batch, batch], 200, [8])
    load = out["expert_load"]
    assert len(load["load_histogram"]) == 2 and len(load["load_histogram"][0]) == 8
    np.testing.assert_allclose(np.sum(load["load_histogram"], -1), 1.0)
    assert out["load_cv"] == pytest.approx(np.mean(load["load_cv"])) and 0 <= out["dead_experts"] <= 1
    assert 0 < out["router_entropy"] <= math.log(8)
    assert "load_cv" in format_results({"after": out})
    dense = AutoModelForCausalLM.from_pretrained(make_model("qwen3"), dtype=torch.float32)
    assert "load_cv" not in evaluate_model(dense, [batch], 200, [8])
