"""BiLD's training semantics (issue 4): train.prompt_kl_weight adds forward KL at tau = 1 on the
prompt positions, a mean over the prompt tokens; bild gets no tau² (issue 16, item 7). Checked
against independent dense computations on the first optimizer step: from the cached top-k + tail
and the student's own full forward, and, for BiLD's recipe at its tau = 3, from both models' own
forwards with BiLD's loss written out in float64 as in its paper."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cache.stream import CacheSource, ShardStream
from pipeline.config import ConfigError, validate
from pipeline.run_paths import cache_dir
from stages import train_student
from stages.train_setup import stream_plan
from stages.train_student import TrainConfig


class _OneProcess:
    num_processes, process_index = 1, 0


def first_row(cfg) -> dict:
    return json.loads((cfg.run_dir / "train" / "metrics.jsonl").read_text().splitlines()[0])


def dense_prompt_kl(cfg, student_path) -> tuple[float, int, int]:
    """(sum of KL over the first step's prompt positions / their count, prompt positions,
    loss-masked count): the teacher's K cached probabilities plus 1 - their sum as one tail
    bucket, the student's full softmax coarsened to the same K + 1 buckets, in float64."""
    stream = ShardStream(CacheSource(cache_dir(cfg.run_dir, "train")), stream_plan(cfg, _OneProcess()))
    out = stream.load(stream.steps(0)[0])
    vocab = CacheSource(cache_dir(cfg.run_dir, "train")).reader.manifest.identity["vocab_size"]
    student = AutoModelForCausalLM.from_pretrained(student_path).eval()
    kl, n_prompt, start = 0.0, 0, 0
    for n in np.asarray(out.seq_lens):
        rows = slice(start, start + n)
        ids, mask = torch.as_tensor(np.asarray(out.input_ids[rows])), np.asarray(out.loss_mask[rows])
        prompt = np.flatnonzero((mask == 0) & (np.arange(n) < n - 1))  # untrained, with a next token
        with torch.no_grad():
            logits = student(ids[None]).logits[0, prompt, :vocab].double()
        lp = torch.log_softmax(logits, -1)
        lq = torch.as_tensor(np.asarray(out.teacher.topk_logprobs[rows], np.float64)[prompt])
        top = torch.as_tensor(np.asarray(out.teacher.topk_ids[rows], np.int64)[prompt])
        p_top = lp.gather(1, top)
        q_tail = (1 - lq.exp().sum(-1)).clamp(min=0)
        p_tail = 1 - p_top.exp().sum(-1)
        tail = torch.where(q_tail > 0, q_tail * (q_tail.clamp(min=1e-300).log() - p_tail.log()), 0.0)
        kl += float((lq.exp() * (lq - p_top)).sum() + tail.sum())
        n_prompt, start = n_prompt + len(prompt), start + n
    n_trained = int(np.asarray(out.loss_mask).sum())
    return kl / n_prompt, n_prompt, n_trained


@pytest.fixture
def pairs_cache(pairs_jsonl):
    return (f"data.source={pairs_jsonl}",)


def test_prompt_kl_equals_a_dense_reference_on_prompt_response_data(train_config, pairs_cache, student_path):
    cfg = train_config("train.steps=1", "train.alpha=0.5", "train.prompt_kl_weight=0.5", "train.router_weight=0",
                       cache=pairs_cache)
    train_student.run(cfg)
    row = first_row(cfg)
    reference, n_prompt, n_trained = dense_prompt_kl(cfg, student_path)
    assert n_prompt > 0 and n_trained > 0
    assert row["prompt_kl"] > 0.01
    assert row["prompt_kl"] == pytest.approx(reference, rel=1e-4, abs=1e-6)
    assert row["loss"] == pytest.approx(0.5 * row["ce"] + 0.5 * row["kd"] + 0.5 * row["prompt_kl"], rel=1e-4)


def test_prompt_kl_normalised_over_the_whole_step_not_per_micro_batch(train_config, pairs_cache):
    """grad_accum 1 and 2 give the same prompt KL and weights: it is divided by the step's count of
    prompt tokens, which differs between micro-batches (a per-micro-batch mean would not match)."""
    runs = {}
    for accum in (1, 2):
        cfg = train_config("train.steps=2", f"train.grad_accum={accum}", "train.alpha=1", "train.kd_loss=bild",
                           "train.temperature=3", "train.prompt_kl_weight=1", "train.router_weight=0",
                           cache=pairs_cache, name=f"accum{accum}")
        train_student.run(cfg)
        rows = [json.loads(line) for line in (cfg.run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
        runs[accum] = rows, load_file(cfg.run_dir / "train" / "final" / "model.safetensors")
    (m1, w1), (m2, w2) = runs[1], runs[2]
    for a, b in zip(m1, m2):
        for key in ("loss", "kd", "prompt_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    for key in w1:  # atol: 1% of lr, as in tests/test_train.py
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-5, atol=1e-5, msg=key)


def test_prompt_kl_is_absent_with_weight_zero(train_config, pairs_cache):
    cfg = train_config("train.steps=1", "train.router_weight=0", cache=pairs_cache)
    train_student.run(cfg)
    assert "prompt_kl" not in first_row(cfg)


def test_bild_semantics_without_ce(train_config, pairs_cache):
    """alpha = 1 (no CE term) with bild on responses and the prompt KL: the loss is kd + prompt_kl."""
    cfg = train_config("train.steps=1", "train.alpha=1", "train.kd_loss=bild", "train.prompt_kl_weight=1",
                       "train.router_weight=0", cache=pairs_cache)
    train_student.run(cfg)
    row = first_row(cfg)
    assert row["prompt_kl"] > 0 and row["loss"] == pytest.approx(row["kd"] + row["prompt_kl"], rel=1e-4)


def bild_by_hand(t_V: torch.Tensor, s_V: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """BiLD (Li et al., 2025) for one position, as its paper writes it: for the top-k logits led by
    the teacher (t-LD) and by the student (s-LD), all differences l_i - l_j (i < j in the leader's
    order) of each side's logits, softmax at tau, KL(teacher || student); the loss is the sum."""

    def half(leader_V: torch.Tensor) -> torch.Tensor:
        ids = leader_V.topk(k).indices
        i, j = torch.triu_indices(k, k, 1)
        q = torch.softmax((t_V[ids][i] - t_V[ids][j]) / tau, -1)
        p = torch.softmax((s_V[ids][i] - s_V[ids][j]) / tau, -1)
        return (q * (q.log() - p.log())).sum()

    return half(t_V) + half(s_V)


def dense_bild_recipe(cfg, teacher_path, student_path, tau: float, k: int = 8) -> tuple[float, float]:
    """(bild mean over the first step's response tokens, forward KL at tau = 1 mean over its prompt
    tokens), from both models' own full-vocabulary forwards (fp32: the MoE grouped matmul has no
    fp64 kernel), the losses in float64."""
    stream = ShardStream(CacheSource(cache_dir(cfg.run_dir, "train")), stream_plan(cfg, _OneProcess()))
    out = stream.load(stream.steps(0)[0])
    vocab = CacheSource(cache_dir(cfg.run_dir, "train")).reader.manifest.identity["vocab_size"]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    student = AutoModelForCausalLM.from_pretrained(student_path).eval()
    bild, kl, n_response, n_prompt, start = 0.0, 0.0, 0, 0, 0
    for n in np.asarray(out.seq_lens):
        ids = torch.as_tensor(np.asarray(out.input_ids[start : start + n]))[None]
        mask = np.asarray(out.loss_mask[start : start + n]).astype(bool)
        start += n
        with torch.no_grad():
            z, s = teacher(ids).logits[0, :, :vocab].double(), student(ids).logits[0, :, :vocab].double()
        for t in np.flatnonzero(mask):
            bild += float(bild_by_hand(z[t], s[t], k, tau))
        prompt = np.flatnonzero(~mask & (np.arange(n) < n - 1))
        lq, lp = torch.log_softmax(z[prompt], -1), torch.log_softmax(s[prompt], -1)
        kl += float((lq.exp() * (lq - lp)).sum())
        n_response, n_prompt = n_response + int(mask.sum()), n_prompt + len(prompt)
    assert n_response > 0 and n_prompt > 0
    return bild / n_response, kl / n_prompt


def test_bild_recipe_at_its_temperature_equals_the_paper(train_config, pairs_jsonl, tokenizer, teacher_path,
                                                        student_path):
    """BiLD's recipe at BiLD's tau = 3 on a cache of the whole vocabulary (so both halves are exact):
    loss = bild + prompt KL, with no tau² (= 9) on bild and the prompt KL a mean over prompt tokens."""
    full = (f"data.source={pairs_jsonl}", f"cache.k={len(tokenizer)}", "cache.preset=exact",
            "cache.targets=topk")
    cfg = train_config("train.steps=1", "train.alpha=1", "train.kd_loss=bild", "train.temperature=3",
                       "train.prompt_kl_weight=1", "train.router_weight=0", cache=full)
    train_student.run(cfg)
    row = first_row(cfg)
    bild, prompt_kl = dense_bild_recipe(cfg, teacher_path, student_path, 3.0)
    assert bild > 0.01 and prompt_kl > 0.01
    assert row["kd"] == pytest.approx(bild, rel=1e-4)
    assert row["prompt_kl"] == pytest.approx(prompt_kl, rel=1e-4)
    assert row["loss"] == pytest.approx(bild + prompt_kl, rel=1e-4)


def test_prompt_kl_is_zero_on_text_data(train_config):
    """Text data trains on every position with a next token: there is no prompt."""
    cfg = train_config("train.steps=1", "train.prompt_kl_weight=1", "train.router_weight=0")
    train_student.run(cfg)
    row = first_row(cfg)
    assert row["prompt_kl"] == 0.0 and row["kd"] > 0


def test_prompt_kl_config():
    assert TrainConfig(alpha=0.0, prompt_kl_weight=1.0).uses_cache()  # needs the teacher even without KD
    assert not TrainConfig(alpha=0.0).uses_cache()
    with pytest.raises(ConfigError, match="prompt_kl_weight"):
        validate(TrainConfig(prompt_kl_weight=-1.0), prefix="train.")
