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


def test_results_before_and_after_against_the_teacher(train_config, student_path):
    cfg = train_config("train.steps=2", "train.router_weight=0.1", "eval.overlap_k=[2]")
    train_student.run(cfg)
    results = evaluate.run(cfg)
    assert results == json.loads((cfg.run_dir / "eval" / "results.json").read_text())
    for label, path in (("before", student_path), ("after", cfg.run_dir / "train" / "final")):
        r = results[label]
        assert {"perplexity", "kl_to_teacher", "top1_agreement", "overlap@2", "overlap@8"} <= set(r)  # 8: cached k
        assert r["perplexity"] == pytest.approx(reference_perplexity(path, cfg.run_dir), rel=1e-4)
        assert r["kl_to_teacher"] > 0 and 0 <= r["top1_agreement"] <= 1
        assert 0 <= r["overlap@2"] <= 1 and 0 <= r["overlap@8"] <= 1
    assert results["before"]["perplexity"] != results["after"]["perplexity"]


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
