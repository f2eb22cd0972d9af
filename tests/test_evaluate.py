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

from stages import evaluate, train_student
from stages.prepare import load_split

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
    cfg = train_config("train.steps=2", "train.router_weight=0.1", "eval.overlap_k=[2]")
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

    batched = evaluate.greedy_continuations(model, prompts, 12, tokenizer.pad_token_id, batch_size=4)
    assert batched == [reference(p, 12) for p in prompts]
    assert evaluate.cut_after_eos([5, 7, 0, 1, 1], {0}) == [5, 7, 0]


def test_eval_device_follows_run_device():
    from pipeline.config import ConfigError

    assert evaluate.eval_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert evaluate.eval_device("auto").type == "cuda"
    else:
        assert evaluate.eval_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="run.device='cuda'"):
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
