"""Stage: held-out metrics of the student before and after training, against the teacher.

    python run_pipeline.py eval --config configs/demo.yaml

On the eval split: perplexity, KL(teacher ‖ student) at τ = 1 over the cached top-k plus
the tail bucket (from cache_eval/), top-1 agreement and overlap@k with the teacher's
top-k; for prompt/response data also Rouge-L of greedy generations against the
references; for MoE models the expert load (per-layer load CV, router entropy, dead-expert
share, load histogram; docs/router.md). Results go to runs/<name>/eval/results.json.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from cache.stream import CacheSource, ShardStream, StreamPlan
from cache.schema import write_json_atomic
from pipeline import state
from pipeline.config import fingerprint, save_config


@dataclass
class EvalConfig:
    split: str = "eval"
    """Prepared split to evaluate on (its cache is cache_<split>/)."""
    batch_size: int = 8
    """Sequences per forward."""
    max_sequences: int = 0
    """Evaluate at most this many sequences (0 = all)."""
    overlap_k: list[int] = field(default_factory=lambda: [8, 32])
    """k of overlap@k with the teacher's top-k (capped at the cached k; the cached k is always reported)."""
    rouge_samples: int = 16
    """Prompt/response data: generations scored with Rouge-L (0 = off)."""
    max_new_tokens: int = 48
    """Tokens generated per prompt for Rouge-L."""
    before: bool = True
    """Also evaluate the student's starting weights."""


@torch.no_grad()
def token_metrics(model, batch: dict, vocab_limit: int, ks: list[int]) -> dict[str, float]:
    """Sums over the batch's loss-masked positions (divide by 'tokens')."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits_TV = model.get_output_embeddings()(hidden[batch["valid"]]).float()[:, :vocab_limit]
    mask = batch["loss_mask"]
    logp_TV = torch.log_softmax(logits_TV, -1)
    labels = batch["labels"].clamp(min=0)
    out = {"tokens": float(mask.sum()), "nll": float(-(logp_TV.gather(1, labels[:, None])[:, 0] * mask).sum())}
    t = batch["teacher"]
    if "topk_ids" in t:
        out.update(teacher_metrics(logp_TV, t, mask, ks))
    return out


def teacher_metrics(logp_TV, t: dict, mask, ks: list[int]) -> dict[str, float]:
    ids_TK, lq_TK = t["topk_ids"], t["topk_logprobs"]
    q_TK = lq_TK.exp()
    q_tail = (1 - q_TK.sum(-1)).clamp(min=1e-12)
    lp_TK = logp_TV.gather(1, ids_TK)
    p_tail = (1 - lp_TK.exp().sum(-1)).clamp(min=1e-12)
    kl_T = (q_TK * (lq_TK - lp_TK)).sum(-1) + q_tail * (q_tail.log() - p_tail.log())
    out = {"kl": float((kl_T * mask).sum()),
           "top1": float(((logp_TV.argmax(-1) == ids_TK[:, 0]) * mask).sum()),
           "teacher_nll": float(-(t["target_logprob"] * mask).sum()) if "target_logprob" in t else 0.0}
    for k in sorted({min(k, ids_TK.shape[1]) for k in ks} | {ids_TK.shape[1]}):  # always overlap@(cached k)
        student_TK = logp_TV.topk(k, -1).indices
        hits = (student_TK[:, :, None] == ids_TK[:, None, :k]).any(-1).float().sum(-1) / k
        out[f"overlap@{k}"] = float((hits * mask).sum())
    return out


def rouge_l(model, tokenizer, ds, n: int, max_new_tokens: int) -> float:
    """Mean Rouge-L F1 of greedy generations from the prompt part against the reference response."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = []
    for row in ds.select(range(min(n, len(ds)))):
        mask, ids = np.asarray(row["loss_mask"]), np.asarray(row["input_ids"])
        start = int(np.argmax(mask)) + 1 if mask.any() else len(ids)
        prompt = torch.as_tensor(ids[:start])[None].to(model.device)
        gen = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or 0)
        hyp = tokenizer.decode(gen[0, start:], skip_special_tokens=True)
        ref = tokenizer.decode(ids[start:], skip_special_tokens=True)
        scores.append(scorer.score(ref, hyp)["rougeL"].fmeasure)
    return float(np.mean(scores)) if scores else float("nan")


def evaluate_model(model, batches: list[dict], vocab_limit: int, ks: list[int]) -> dict[str, float]:
    model.eval()
    sums: dict[str, float] = {}
    capture, loads = router_capture(model), []
    with capture or contextlib.nullcontext():
        for batch in batches:
            for key, value in token_metrics(model, batch, vocab_limit, ks).items():
                sums[key] = sums.get(key, 0.0) + value
            if capture is not None:
                loads.append(batch_load(capture.pop(), batch, int(getattr(model.config, "num_experts_per_tok", 1))))
    n = max(sums.pop("tokens", 0.0), 1.0)
    out = {"perplexity": math.exp(sums.pop("nll") / n)}
    if "kl" in sums:
        out["teacher_perplexity"] = math.exp(sums.pop("teacher_nll") / n)
        out["kl_to_teacher"] = sums.pop("kl") / n
        out["top1_agreement"] = sums.pop("top1") / n
    out.update({k: v / n for k, v in sums.items()})
    return out | (expert_load_results(loads) if loads else {}) | {"tokens": int(n)}


def router_capture(model):
    """A RouterCapture on a MoE model of a supported family, else None (dense or unsupported)."""
    from pipeline.config import ConfigError
    from pipeline.router import RouterCapture, num_experts, router_family

    try:
        family = router_family(model.config) if num_experts(model.config) else None
    except ConfigError:
        return None
    return RouterCapture(model, family) if family is not None else None


def batch_load(logits_LNE: list[torch.Tensor], batch: dict, top_k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(expert token counts [L, E], summed router entropy [L], routed rows) of one batch, padding excluded."""
    from pipeline.router_losses import expert_counts

    valid_N = batch["attention_mask"].reshape(-1).bool()
    pairs = [expert_counts(g, valid_N, top_k) for g in logits_LNE]
    return torch.stack([c for c, _ in pairs]), torch.stack([h for _, h in pairs]), float(valid_N.sum())


def expert_load_results(loads: list) -> dict:
    """Layer means of load CV, router entropy, dead-expert share; per-layer values and the load
    histogram (share of top-k assignments per expert) under 'expert_load'."""
    from pipeline.router_losses import load_summary

    per_layer = load_summary(sum(c for c, _, _ in loads), sum(h for _, h, _ in loads), sum(r for _, _, r in loads))
    means = {k: float(np.mean(per_layer[k])) for k in ("load_cv", "router_entropy", "dead_experts")}
    return means | {"expert_load": per_layer}


def eval_batches(cfg) -> tuple[list[dict], int]:
    from pipeline.batches import PreparedSource, collate
    from stages.cache_teacher import cache_dir

    directory = cache_dir(cfg.run_dir, cfg.eval.split)
    if (directory / "manifest.json").exists():
        source = CacheSource(directory)
        vocab = source.reader.manifest.identity["vocab_size"]
    else:
        source = PreparedSource(cfg.run_dir, cfg.eval.split)
        vocab = 0
    stream = ShardStream(source, StreamPlan(batch_size=1, shuffle_window=0, drop_last=False))
    seqs = np.concatenate(stream.steps(0))
    if cfg.eval.max_sequences:
        seqs = seqs[: cfg.eval.max_sequences]
    steps = [seqs[i:i + cfg.eval.batch_size] for i in range(0, len(seqs), cfg.eval.batch_size)]
    return [collate(stream.load(step)) for step in steps], vocab


def run(cfg, force: bool = False) -> dict:
    from stages.prepare import load_split
    from stages.train_setup import student_tokenizer
    from pipeline.models import load_causal_lm

    out_dir = cfg.run_dir / "eval"
    inputs = fingerprint(cfg.eval, cfg.student, cfg.train, cfg.cache, cfg.data)
    if not state.begin(cfg.run_dir, "evaluate", inputs, [out_dir], force):
        return json.loads((out_dir / "results.json").read_text())
    batches, vocab = eval_batches(cfg)
    tokenizer = student_tokenizer(cfg)
    ds, manifest = load_split(cfg.run_dir, cfg.eval.split)
    models = {"before": cfg.student.path} if cfg.eval.before else {}
    models["after"] = str(cfg.run_dir / "train" / "final")
    results = {}
    for label, path in models.items():
        model = load_causal_lm(path, torch.float32, torch.device("cpu"), "sdpa", False)
        results[label] = evaluate_model(model, batches, vocab or len(tokenizer), list(cfg.eval.overlap_k))
        if manifest["mode"] == "prompt_response" and cfg.eval.rouge_samples:
            results[label]["rouge_l"] = rouge_l(model, tokenizer, ds, cfg.eval.rouge_samples, cfg.eval.max_new_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    write_json_atomic(out_dir / "results.json", json.dumps(results, indent=1))
    print(format_results(results), flush=True)
    state.write_state(cfg.run_dir, "evaluate", "done", inputs)
    return results


def format_results(results: dict) -> str:
    keys = sorted({k for r in results.values() for k, v in r.items() if k != "tokens" and isinstance(v, float)},
                  key=_metric_order)
    lines = [f"{'metric':<22}" + "".join(f"{label:>12}" for label in results)]
    for key in keys:
        lines.append(f"{key:<22}" + "".join(f"{r.get(key, float('nan')):>12.4f}" for r in results.values()))
    return "\n".join(lines)


def _metric_order(key: str) -> tuple:
    order = ["perplexity", "teacher_perplexity", "kl_to_teacher", "top1_agreement", "rouge_l"]
    return (order.index(key) if key in order else len(order), key)
