"""Evaluate stage and the SFT path (issue 3): metrics against independent references, and
`run_pipeline.py run` without a teacher (prepare → train on prepared data → evaluate)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from pipeline import generation
from pipeline.splits import load_split
from stages import evaluate, train_student

ROOT = Path(__file__).resolve().parent.parent


def reference_perplexity(model_path, run_dir: Path, split: str = "eval") -> float:
    """exp(mean CE over loss-masked tokens), one unpadded forward per sequence."""
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    ds, _ = load_split(run_dir, split)
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in ds:
            ids = torch.tensor(row["input_ids"])[None]
            mask = torch.tensor(row["loss_mask"], dtype=torch.bool)[:-1]
            logits = model(ids).logits[0, :-1][mask]
            nll += F.cross_entropy(logits, ids[0, 1:][mask], reduction="sum").item()
            n += int(mask.sum())
    return math.exp(nll / n)


def reference_teacher_metrics(teacher_path, student_path, run_dir: Path, k: int, split: str = "eval") -> dict:
    """Dense float64 over the whole vocabulary, one unpadded forward per sequence and model:
    KL(teacher ‖ student), the K+1-bucket KL over the teacher's own top-k, top-1 agreement and
    the teacher's perplexity, averaged over the loss-masked tokens."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, experts_implementation="eager").double().eval()
    student = AutoModelForCausalLM.from_pretrained(student_path, experts_implementation="eager").double().eval()
    ds, _ = load_split(run_dir, split)
    sums, n = dict.fromkeys(("kl", "bucket", "top1", "teacher_nll"), 0.0), 0
    with torch.no_grad():
        for row in ds:
            ids = torch.tensor(row["input_ids"])[None]
            mask = torch.tensor(row["loss_mask"], dtype=torch.bool)
            lq = torch.log_softmax(teacher(ids).logits[0][mask], -1)
            lp = torch.log_softmax(student(ids).logits[0][mask], -1)
            sums["kl"] += float((lq.exp() * (lq - lp)).sum())
            top = lq.topk(k, -1).indices
            q_k, p_k = lq.gather(1, top).exp(), lp.gather(1, top).exp()
            q_tail, p_tail = 1 - q_k.sum(-1), 1 - p_k.sum(-1)
            sums["bucket"] += float((q_k * (q_k.log() - p_k.log())).sum() + (q_tail * (q_tail / p_tail).log()).sum())
            sums["top1"] += float((lq.argmax(-1) == lp.argmax(-1)).sum())
            targets = torch.tensor(row["input_ids"])[1:][mask[:-1]]
            sums["teacher_nll"] -= float(lq[: len(targets)].gather(1, targets[:, None]).sum())
            n += int(mask.sum())
    return {key: value / n for key, value in sums.items()} | {"tokens": n}


def link_final(cfg, model_path: Path) -> None:
    """The run's train/final is ``model_path`` (evaluate without training)."""
    (cfg.run_dir / "train").mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "train" / "final").symlink_to(Path(model_path).resolve(), target_is_directory=True)


def test_results_before_and_after_against_the_teacher(train_config, teacher_path, student_path):
    cfg = train_config("train.steps=2", "train.router_weight=0.1", "eval.overlap_k=[2,8]")
    train_student.run(cfg)
    results = evaluate.run(cfg)
    assert results == json.loads((cfg.run_dir / "eval" / "results.json").read_text())
    vocab = AutoModelForCausalLM.from_pretrained(teacher_path).config.vocab_size
    assert vocab == cfg_vocab(cfg)  # the evaluated vocabulary is the teacher's whole vocabulary
    for label, path in (("before", student_path), ("after", cfg.run_dir / "train" / "final")):
        r, ref = results[label], reference_teacher_metrics(teacher_path, path, cfg.run_dir, k=8)
        assert {"perplexity", "kl_to_teacher", evaluate.BOUND, "top1_agreement", "overlap@2", "overlap@8"} <= set(r)
        assert "kl_to_teacher_missing" not in r
        assert r["perplexity"] == pytest.approx(reference_perplexity(path, cfg.run_dir), rel=1e-4)
        assert r["kl_to_teacher"] == pytest.approx(ref["kl"], rel=1e-4)
        assert r["teacher_perplexity"] == pytest.approx(math.exp(ref["teacher_nll"]), rel=1e-4)
        assert r[evaluate.BOUND] == pytest.approx(ref["bucket"], rel=1e-2, abs=1e-4)  # cached log-probs are fp16
        assert 0 < r[evaluate.BOUND] < r["kl_to_teacher"]  # a lower bound, and a strict one here
        assert abs(r["top1_agreement"] - ref["top1"]) <= 2 / ref["tokens"]  # up to near-ties in fp32
        assert 0 <= r["overlap@2"] <= 1 and 0 <= r["overlap@8"] <= 1
    assert results["before"]["perplexity"] != results["after"]["perplexity"]


def cfg_vocab(cfg) -> int:
    return json.loads((cfg.run_dir / "cache_eval" / "manifest.json").read_text())["identity"]["vocab_size"]


def test_the_teacher_against_itself_gives_zero(train_config, teacher_path):
    cfg = train_config("eval.overlap_k=[2,16]", f"student.path={teacher_path}", "eval.rouge_samples=0")
    link_final(cfg, teacher_path)
    r = evaluate.run(cfg)["after"]
    assert r["kl_to_teacher"] == pytest.approx(0, abs=1e-6)
    assert r[evaluate.BOUND] == pytest.approx(0, abs=1e-3)  # against the fp16 cached log-probs
    assert r["top1_agreement"] == 1 and r["overlap@2"] == 1 and r["overlap@16"] == 1  # 16 > cached k: live teacher
    assert "overlap@8" not in r and "overlap_skipped" not in r  # only the configured ks, the cached k is not added
    assert r["teacher_perplexity"] == pytest.approx(r["perplexity"], rel=1e-6)


def test_without_the_teacher_only_the_bound_is_reported(train_config, student_path, capsys):
    live = train_config("eval.rouge_samples=0", name="live")
    link_final(live, student_path)
    with_teacher = evaluate.run(live)["after"]
    for name, change in (("no_path", {"path": ""}), ("switched_off", {})):
        cfg = train_config("eval.rouge_samples=0", *(["eval.run_teacher=false"] if not change else []), name=name)
        cfg.teacher.path = change.get("path", cfg.teacher.path)
        link_final(cfg, student_path)
        r = evaluate.run(cfg)["after"]
        assert "kl_to_teacher" not in r
        assert r["kl_to_teacher_missing"] == ("teacher.path is empty" if change else "eval.run_teacher=false")
        assert "kl_to_teacher (full vocabulary) not measured" in capsys.readouterr().out
        assert r[evaluate.BOUND] == pytest.approx(with_teacher[evaluate.BOUND], rel=1e-6)
        # the cached top-k and the live teacher agree on the teacher's top-1 and top-8 (the cached k)
        n = r["tokens"]
        assert abs(r["top1_agreement"] - with_teacher["top1_agreement"]) <= 2 / n
        assert abs(r["overlap@8"] - with_teacher["overlap@8"]) <= 2 / n
        assert "overlap@32" in with_teacher and "overlap@32" not in r  # the cache holds the teacher's top-8 only
        assert r["overlap_skipped"] == "overlap@32: the cache holds the teacher's top-8 and the teacher was not run"


def test_batched_generation_equals_one_at_a_time_greedy(teacher_path, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    texts = ["Return the", "Open a file and read it", "x", "The default is None when the argument is missing"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: the batch is left-padded

    def reference(prompt: list[int], new: int) -> list[int]:  # argmax of the model's own forward, no generate
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(new):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] == model.config.eos_token_id:
                    break
        return ids[len(prompt):]

    batched = generation.greedy_continuations(model, prompts, 12, tokenizer.pad_token_id, batch_size=4)
    assert batched == [reference(p, 12) for p in prompts]
    assert generation.cut_after_eos([5, 7, 0, 1, 1], {0}) == [5, 7, 0]


def test_eval_device_follows_run_device():
    from pipeline.config import ConfigError

    assert evaluate.eval_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert evaluate.eval_device("auto").type == "cuda"
    else:
        assert evaluate.eval_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="run.device=cuda but no CUDA device"):
            evaluate.eval_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluate_on_the_gpu_equals_the_cpu(train_config, student_path):
    results = {}
    for device in ("cpu", "cuda"):
        cfg = train_config(f"run.device={device}", "teacher.dtype=float32", name=f"on_{device}")
        link_final(cfg, student_path)
        results[device] = evaluate.run(cfg)["after"]
    for key in ("perplexity", "kl_to_teacher", evaluate.BOUND, "top1_agreement", "overlap@8"):
        assert results["cuda"][key] == pytest.approx(results["cpu"][key], rel=1e-3, abs=1e-3), key
    assert results["cuda"]["rouge_l"] == pytest.approx(results["cpu"]["rouge_l"], abs=0.05)


@pytest.mark.slow
def test_sft_without_a_cache_runs_the_whole_pipeline(tmp_path, pairs_jsonl, student_path):
    overrides = [f"run.root={tmp_path / 'runs'}", "run.name=sft", f"data.source={pairs_jsonl}",
                 f"student.path={student_path}", "data.max_length=32", "data.max_samples=48",
                 "train.alpha=0", "train.router_weight=0", "train.steps=8", "train.batch_size=4", "train.lr=1e-2",
                 "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=100", "eval.rouge_samples=2",
                 "eval.max_new_tokens=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "run_pipeline.py", "run", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "sft"
    assert not (run_dir / "cache").exists()
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["kd"] == 0 and r["router"] == 0 and r["loss"] == r["ce"] for r in rows)
    assert sum(r["loss"] for r in rows[-2:]) < sum(r["loss"] for r in rows[:2]) - 0.5
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    for label in ("before", "after"):
        assert 0 <= results[label]["rouge_l"] <= 1
        assert "kl_to_teacher" not in results[label]  # no teacher, no teacher metrics
    assert results["after"]["perplexity"] < results["before"]["perplexity"]
    assert results["after"]["perplexity"] == pytest.approx(reference_perplexity(run_dir / "train" / "final", run_dir),
                                                           rel=1e-4)


def brute_force_overlap(logp_TV: torch.Tensor, teacher_ids_TK: torch.Tensor, k: int) -> list[float]:
    """|student top-k ∩ teacher top-k| / k per position, by Python set intersection."""
    student = logp_TV.topk(k, -1).indices.tolist()
    return [len(set(s) & set(t[:k])) / k for s, t in zip(student, teacher_ids_TK.tolist())]


@pytest.mark.parametrize("rows", [0, 3])  # one chunk of rows, and chunks that do not divide T
def test_overlap_equals_set_intersection(rows):
    gen = torch.Generator().manual_seed(0)
    t, vocab, ks = 11, 300, [1, 5, 64, 299]
    logp_TV = torch.log_softmax(torch.randn(t, vocab, generator=gen, dtype=torch.float64), -1)
    near_TV = logp_TV + 0.3 * torch.randn(t, vocab, generator=gen, dtype=torch.float64)  # a similar teacher
    teacher_TK = near_TV.topk(max(ks), -1).indices
    hits = evaluate.topk_hits(logp_TV, teacher_TK, ks, rows=rows)
    for i, k in enumerate(ks):
        reference = [round(x * k) for x in brute_force_overlap(logp_TV, teacher_TK, k)]
        assert hits[:, i].tolist() == reference  # exact counts
    mask = torch.tensor([1.0] * 8 + [0.0] * 3)
    got = evaluate.agreement(logp_TV, teacher_TK, mask, ks)
    for k in ks:
        assert got[f"overlap@{k}"] == pytest.approx(sum(brute_force_overlap(logp_TV, teacher_TK, k)[:8]))
    assert 0 < got["overlap@5"] < 8 and got["overlap@299"] > got["overlap@5"]  # neither trivial nor all


def test_overlap_is_capped_to_the_configured_ks():
    assert evaluate.overlap_ks([8, 32], cached_k=2048, live=False, vocab=4096) == [8, 32]  # no overlap@2048 added
    assert evaluate.overlap_ks([8, 32], cached_k=16, live=False, vocab=4096) == [8]  # the cache has no top-32
    assert evaluate.overlap_ks([8, 32], cached_k=16, live=True, vocab=4096) == [8, 32]
    assert evaluate.overlap_ks([8, 4096], cached_k=4096, live=True, vocab=4096) == [8]  # overlap@V is always 1


def reference_sampled(teacher_path, student_path, run_dir: Path) -> dict:
    """Float64, one unpadded forward per sequence: the exact cross-entropy H(q, p) of the teacher to the
    student; its estimate -Σ (c/N)·log p from the cached draws (read back sample by sample); and
    top-1 agreement of the student's argmax with the most drawn id (ties: the smallest id)."""
    from cache_helpers import by_sample

    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, experts_implementation="eager").double().eval()
    student = AutoModelForCausalLM.from_pretrained(student_path, experts_implementation="eager").double().eval()
    cached = by_sample(run_dir / "cache_eval")
    ds, _ = load_split(run_dir, "eval")
    sums, n = dict.fromkeys(("ce", "estimate", "top1"), 0.0), 0
    with torch.no_grad():
        for row in ds:
            ids, seq = torch.tensor(row["input_ids"])[None], cached[int(row["sample_id"])]
            lq = torch.log_softmax(teacher(ids).logits[0], -1)
            lp = torch.log_softmax(student(ids).logits[0], -1)
            starts = [0, *torch.tensor(seq["draw_n"].astype("int64")).cumsum(0).tolist()]
            for pos in map(int, row["loss_mask"].nonzero()[0]):
                sums["ce"] -= float((lq[pos].exp() * lp[pos]).sum())
                drawn = seq["draw_ids"][starts[pos]:starts[pos + 1]].tolist()
                counts = seq["draw_counts"][starts[pos]:starts[pos + 1]].tolist()
                sums["estimate"] -= sum(c * float(lp[pos, i]) for i, c in zip(drawn, counts)) / sum(counts)
                mode = min(i for i, c in zip(drawn, counts) if c == max(counts))
                sums["top1"] += int(lp[pos].argmax()) == mode
                n += 1
    return {key: value / n for key, value in sums.items()}


def test_a_cache_of_draws_only_still_reports_cross_entropy_and_top1(train_config, teacher_path, student_path, capsys):
    """cache.k=0 with draws, no teacher: the honest metrics are an unbiased estimate of the cross-entropy
    (KL + the teacher's entropy: the draws' log-probs are not cached) and top-1 against the most drawn id."""
    draws_only = ("cache.k=0", "cache.targets=sampled", "cache.num_draws=4096")
    cfg = train_config("eval.rouge_samples=0", "eval.before=false", "eval.run_teacher=false", cache=draws_only,
                       name="drawn")
    link_final(cfg, student_path)
    r = evaluate.run(cfg)["after"]
    ref = reference_sampled(teacher_path, student_path, cfg.run_dir)
    assert r[evaluate.SAMPLED_CE] == pytest.approx(ref["estimate"], rel=1e-4)
    assert r[evaluate.SAMPLED_CE] == pytest.approx(ref["ce"], rel=0.02)  # 4,096 draws: an unbiased estimate
    assert abs(r[evaluate.SAMPLED_TOP1] - ref["top1"]) <= 2 / r["tokens"]  # up to near-ties in fp32
    assert "kl_to_teacher" not in r and evaluate.BOUND not in r and "top1_agreement" not in r
    assert "format v1 does not store" in r["sampled_estimates"] and "teacher_perplexity" in r
    assert evaluate.SAMPLED_CE in capsys.readouterr().out
    live = train_config("eval.rouge_samples=0", "eval.before=false", cache=draws_only, name="drawn_live")
    link_final(live, student_path)
    with_teacher = evaluate.run(live)["after"]  # the live teacher: the full KL, no estimates
    assert with_teacher["kl_to_teacher"] < ref["ce"] and evaluate.SAMPLED_CE not in with_teacher
    assert with_teacher["top1_agreement"] == pytest.approx(r[evaluate.SAMPLED_TOP1], abs=0.05)
